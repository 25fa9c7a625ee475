"""Tiny instances of any Hugging Face causal LM type, built from the type's own config class (no downloads).

``build(model_type)`` shrinks the type's default config -- layers, hidden size, heads and KV heads, head
dimension, intermediate sizes, experts and experts per token, vocabulary, and the same inside nested text
and vision configs -- by passing small values for every size argument the config class takes, builds the
causal-LM class from it and casts it to float64.  A type whose config or model cannot be built small (or
that still has more than ``MAX_PARAMS`` parameters) raises :class:`Unbuildable` with the reason.
``compare(model_type)`` is the float64 equivalence test of memops' patched model against the unpatched one
(text inputs, and an image per sequence for a vision-language model: :func:`image_inputs`).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

from .rule import IMAGE_TEXT, model_class  # noqa: F401  (callers use tiny.model_class)

VOCAB = 97
MAX_PARAMS = 4_000_000
# size arguments by the names config classes use for them
SMALL: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    n_embd=32,
    d_model=32,
    embed_dim=32,
    intermediate_size=48,
    ffn_hidden_size=48,
    n_inner=48,
    num_hidden_layers=2,
    n_layer=2,
    num_layers=2,
    n_layers=2,
    num_attention_heads=4,
    n_head=4,
    n_heads=4,
    num_heads=4,
    num_key_value_heads=2,
    num_kv_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    n_positions=64,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    moe_num_experts=4,
    num_experts_per_tok=2,
    moe_k=2,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=16,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    rotary_dim=4,
    index_head_dim=8,
    index_n_heads=2,
    index_topk=4,
    sliding_window=16,
    attention_types=[[["global", "local"], 1]],
    vocab_size_per_layer_input=VOCAB,
    hidden_size_per_layer_input=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    output_router_logits=True,
    router_aux_loss_coef=0.1,
    # vision-language models: image / video token ids inside the tiny vocabulary (text ids are drawn above
    # ``SPECIAL``), 4 tokens per image where the config fixes that count, the 32-pixel images of ``VISION``
    image_token_id=5,
    image_token_index=5,
    video_token_id=6,
    video_token_index=6,
    vision_start_token_id=7,
    vision_end_token_id=8,
    mm_tokens_per_image=4,
    projector_patch_to_query_dict={16: 4},
    image_grid_pinpoints=[[32, 32]],
    cross_attention_layers=[1],  # Mllama: the text layer that attends to the image
    mamba_n_heads=4,  # Granite 4 (hybrid): its Mamba heads must divide 2 x hidden_size
    n_groups=1,  # Mamba-2, Nemotron-H: state groups, at most the heads
)
IMAGE_TOKEN = SMALL["image_token_id"]
SPECIAL = 16  # token ids below this are special (pad, bos, eos, image, video, ...)
# vision towers: a few patches of a small image
VISION = dict(
    hidden_size=16,
    intermediate_size=64,  # 4x: Llama 4's pixel-shuffle adapter takes hidden_size / ratio**2 = 4 x hidden_size
    num_hidden_layers=1,
    depth=1,
    num_attention_heads=2,
    num_heads=2,
    image_size=32,
    patch_size=8,
    head_dim=8,
    out_hidden_size=SMALL["hidden_size"],  # a merger's output: the text model's width
    spatial_merge_size=2,
    temporal_patch_size=1,
    pooling_kernel_size=2,
    num_key_value_heads=2,
    mm_embed_dim=SMALL["hidden_size"],  # Gemma 4 unified: the patch embedding's width is the text's
    mm_posemb_size=8,
    output_proj_dims=SMALL["hidden_size"],
    embed_dim=16,  # Qwen2-VL: the tower's width (its hidden_size is the merger's output: the text's)
    # Llama 4: the pixel-shuffle adapter's width (its input: hidden_size / ratio**2); Mllama: the output
    # concatenates the last and the intermediate layers' states, (1 + 1) x hidden_size
    vision_output_dim=32,
    projector_input_dim=32,
    projector_output_dim=32,
    intermediate_layers_indices=[0],
    num_global_layers=1,
)


# the equivalence test's bound on the relative difference (loss and every parameter's gradient): float64
# rounding of two orderings of the same sums, with room for a few thousand terms
TOLERANCE = 1e-12


class Unbuildable(RuntimeError):
    """A model type memops cannot build small here (the reason in the message)."""


def _accepted(cls, values: dict) -> dict:
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) and len(params) <= 3:
        return dict(values)  # a config taking everything as **kwargs
    return {k: v for k, v in values.items() if k in params}


_LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "depth")


def _layer_index(key) -> int | None:
    if isinstance(key, int):
        return key
    return int(key) if isinstance(key, str) and key.isdigit() else None


def _per_layer(defaults: dict, small: dict, keep_last: bool = False) -> dict:
    """The default config's per-layer settings (lists or patterns as long as its layer count, lists of layer
    indices, dicts keyed by layer index) cut to the small layer count -- its first layers, or with
    ``keep_last`` its first layers but one and its last (a model whose first layers are all of one kind,
    hash-routed say, is built with one of each) -- and no dropout (patched and unpatched runs must see the
    same network)."""
    old = next((defaults[k] for k in _LAYERS if isinstance(defaults.get(k), int)), None)
    new = next((small[k] for k in _LAYERS if k in small and k in defaults), None)
    keep = list(range(new)) if new else []
    if keep_last and old and new and old > new:
        keep = [*range(new - 1), old - 1]
    out: dict[str, Any] = {}
    for key, value in defaults.items():
        if key in small:
            continue  # given small explicitly (Mllama's intermediate_layers_indices)
        if "drop" in key and type(value) is float:
            out[key] = 0.0
        elif old and new and isinstance(value, (list, tuple, str)) and len(value) == old and old != new:
            picked = [value[i] for i in keep]
            out[key] = "".join(picked) if isinstance(value, str) else type(value)(picked)
        elif (
            old and new and "layer" in key and isinstance(value, list) and value and len(value) != old
            and all(type(i) is int and 0 <= i < old for i in value)
        ):  # fmt: skip
            out[key] = [pos for pos, i in enumerate(keep) if i in value]  # layer indices (``mlp_only_layers``)
        elif new and isinstance(value, dict) and value and all(_layer_index(k) is not None for k in value):
            at = {_layer_index(k): k for k in value}
            out[key] = {
                (f"{pos:0{len(at[i])}d}" if isinstance(at[i], str) else pos): value[at[i]]
                for pos, i in enumerate(keep)
                if i in at
            }
    return out


# second tries: attention that needs as many KV heads as query heads (multi-head latent attention); a model
# whose first layers are all of one kind (its last layer kept in place of one); multimodal rotary sections
# fitted to the small head (a model whose code defaults them to a full-size head's: GLM-4V, PaddleOCR-VL);
# heads twice as wide (Mamba-2: heads x head_dim must be 2 x hidden_size); a hybrid whose default config
# leaves its layer types unset (LFM2-MoE): a convolution layer and an attention layer; one expert per token
# (ZAYA takes no other); no layers sharing another's KV cache (Gemma 3n: with two layers, no full-attention
# layer produces one); rotary parameters for each layer type where the default config leaves them empty
# (Cohere Compass)
VARIANTS: tuple[dict[str, Any], ...] = (
    {},
    {"num_key_value_heads": SMALL["num_attention_heads"]},
    {"keep_last_layer": True},
    {"mrope": True},
    {"head_dim": 2 * SMALL["head_dim"]},
    {"layer_types": ["conv", "full_attention"]},
    {"num_experts_per_tok": 1},
    {"num_kv_shared_layers": 0},
    {"rope_per_layer_type": True},
)


def _fit_mrope(text: dict) -> None:
    """``text``'s ``rope_parameters`` with ``mrope_section`` -- the rotary half-dimension split over (time, height,
    width) -- made to fit its small head (its rotary part, with multi-head latent attention): as even a split as
    ``head_dim * partial_rotary_factor / 2`` allows."""
    rope = dict(text.get("rope_parameters") or {})
    head = text.get("qk_rope_head_dim") or text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    half = int(head * rope.get("partial_rotary_factor", text.get("partial_rotary_factor") or 1.0)) // 2
    rope["mrope_section"] = [half // 3 + (i < half % 3) for i in range(3)]
    text["rope_parameters"] = rope


def _rope_per_layer_type(text: dict) -> None:
    """Default rotary parameters for each of ``text``'s layer types (a config keying them by layer type)."""
    types = sorted(set(text.get("layer_types") or ["full_attention", "sliding_attention"]))
    text["rope_parameters"] = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in types}


def _as_lists(defaults: dict, values: dict) -> dict:
    """A small size given as a number where the config holds a list of sizes (ERNIE 4.5-VL's experts per
    modality, Molmo 2's image height and width, Gemma 3n's intermediate size per layer): the number in each
    entry, one per small layer for a per-layer list."""
    layers = next((defaults[k] for k in _LAYERS if isinstance(defaults.get(k), int)), None)
    small_layers = next((values[k] for k in _LAYERS if k in values and k in defaults), layers)

    def listed(k, v):
        default = defaults.get(k)
        if type(v) is not int or not isinstance(default, list) or not default:
            return v
        if not all(type(i) is int for i in default):
            return v
        return [v] * (small_layers if len(default) == layers else len(default))

    return {k: listed(k, v) for k, v in values.items()}


def small_config(config_cls, overrides: dict | None = None):
    """``config_cls`` with every size it takes made small (nested text / vision configs too); ``overrides``
    replace entries of :data:`SMALL`."""
    small_values = {**SMALL, **(overrides or {})}
    keep_last = small_values.pop("keep_last_layer", False)
    mrope = small_values.pop("mrope", False)
    rope_per_type = small_values.pop("rope_per_layer_type", False)
    base = config_cls()
    defaults = base.to_dict()
    values = _accepted(config_cls, small_values)
    values.update(_accepted(config_cls, _per_layer(defaults, values, keep_last)))
    values = _as_lists(defaults, values)
    if isinstance(defaults.get("vision_feature_layer"), list):  # VipLlava: states of layers the tiny tower has
        values["vision_feature_layer"] = [-2, -1]
    params = inspect.signature(config_cls.__init__).parameters
    for key, small in (("text_config", small_values), ("vision_config", VISION)):
        sub = getattr(base, key, None)
        if sub is None and key in params and key in getattr(config_cls, "sub_configs", {}):
            sub = config_cls.sub_configs[key]()  # none by default (Gemma 4's vision tower): the default one
        if sub is not None and hasattr(sub, "to_dict") and key in params:
            sub_dict = sub.to_dict()
            # sizes the dict holds are passed back whether or not ``__init__`` names them (a derived head_dim)
            sub_values = {**{k: v for k, v in small.items() if k in sub_dict}, **_accepted(type(sub), small)}
            if key == "vision_config" and {"embed_dim", "hidden_size"} <= set(sub_dict):
                sub_values["hidden_size"] = small_values["hidden_size"]  # Qwen2-VL: the merger's output width
            # the whole dict is passed: its per-layer entries are cut whether or not ``__init__`` names them
            sub_values.update(_per_layer(sub_dict, sub_values, keep_last))
            values[key] = {**sub_dict, **_as_lists(sub_dict, sub_values)}
    for wanted, fit in ((mrope, _fit_mrope), (rope_per_type, _rope_per_layer_type)):
        if not wanted:
            continue
        if isinstance(values.get("text_config"), dict):
            fit(values["text_config"])
        else:
            flat = {**defaults, **values}
            fit(flat)
            values["rope_parameters"] = flat["rope_parameters"]
    return config_cls(**values)


def build(model_type: str, seed: int = 0, overrides: dict | None = None):
    """A tiny float64 instance of ``model_type``'s causal-LM class, in training mode (``overrides``: entries
    of :data:`SMALL` replaced)."""
    from transformers.models.auto import configuration_auto

    cls = model_class(model_type)
    config_cls = (
        getattr(cls, "config_class", None) or configuration_auto.CONFIG_MAPPING[model_type.removesuffix(IMAGE_TEXT)]
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            config = small_config(config_cls, overrides)
            with torch.device("meta"):
                size = sum(p.numel() for p in cls(config).parameters())
        except Exception as exc:  # noqa: BLE001  (the reason is the answer)
            raise Unbuildable(f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
        if size > MAX_PARAMS:
            raise Unbuildable(f"{size} parameters after shrinking every size argument the config takes")
        torch.manual_seed(seed)
        model = cls(config)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")  # the grouped-matmul experts take no float64
    return model.double().train()


def _inputs(model, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(SPECIAL, VOCAB, (2, 7), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100  # a prompt
    labels[1, -1] = -100
    return ids, labels


class NoImageInput(Unbuildable):
    """A vision-language model no image input could be built for here."""


def _image_layouts(model, batch: int, g):
    """Candidate pixel inputs of one small image per sequence, in the layouts vision towers take: Qwen-style
    patches with their grid (flattened, as images, or as one sequence of images; with their merge sizes where
    the forward takes them), MiniCPM-V's patches in a row with their grids, NaFlex patches with their spatial
    shapes, Gemma 4's (merged) patches with their positions, plain ``[B, C, H, W]``, one or more crops
    ``[B, k, C, H, W]`` with ``image_sizes``, ``[B, 1, C, H, W]`` (with a pixel mask where the forward takes
    one)."""
    vision = model.config.vision_config

    def get(name, default):
        value = getattr(vision, name, None) or default
        return value[0] if isinstance(value, (list, tuple)) else value

    size, patch = get("image_size", 32), get("patch_size", 8)
    channels, temporal, merge = get("num_channels", 3), get("temporal_patch_size", 1), get("spatial_merge_size", 1)
    forward = inspect.signature(model.forward).parameters
    features = inspect.signature(model.get_image_features).parameters

    def pixels(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    sizes = torch.tensor([[size, size]] * batch)
    if "image_grid_thw" in forward:
        side = 2 * merge
        grid, n = torch.tensor([[1, side, side]] * batch), batch * side * side
        extra = {"image_merge_sizes": torch.tensor([merge] * batch)} if "image_merge_sizes" in forward else {}
        # the patches flattened (Qwen), as images (Kimi-K2.5), as one sequence of images (PaddleOCR-VL)
        for shape in ((n, channels * temporal * patch * patch), (n, channels, patch, patch), (1, n, channels, patch,
                      patch)):  # fmt: skip
            yield dict(pixel_values=pixels(*shape), image_grid_thw=grid, **extra)
    if "target_sizes" in forward:  # MiniCPM-V: the images' patches side by side in one row, with their grids
        side = size // patch
        yield dict(pixel_values=pixels(1, channels, patch, batch * side * side * patch),
                   target_sizes=torch.tensor([[side, side]] * batch))  # fmt: skip
    if "spatial_shapes" in features:
        n = (size // patch) ** 2
        yield dict(pixel_values=pixels(batch, n, channels * patch * patch), pixel_attention_mask=torch.ones(
            batch, n, dtype=torch.bool), spatial_shapes=torch.tensor([[size // patch] * 2] * batch))  # fmt: skip
    if "image_position_ids" in forward:  # Gemma 4: patches with their (x, y) positions
        merged = getattr(vision, "model_patch_size", patch)  # Gemma 4 unified: merged patches
        side = size // merged
        xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), -1).reshape(-1, 2)
        yield dict(pixel_values=pixels(batch, side * side, channels * merged * merged),
                   image_position_ids=xy.expand(batch, -1, -1).clone())  # fmt: skip
    yield dict(pixel_values=pixels(batch, channels, size, size))
    if "image_sizes" in forward:
        yield dict(pixel_values=pixels(batch, channels, size, size), image_sizes=sizes)
        for crops in (1, 2, 3, 5):
            yield dict(pixel_values=pixels(batch, crops, channels, size, size), image_sizes=sizes)
    yield dict(pixel_values=pixels(batch, 1, channels, size, size))
    if "pixel_attention_mask" in forward:
        mask = torch.ones(batch, 1, size, size, dtype=torch.bool)
        yield dict(pixel_values=pixels(batch, 1, channels, size, size), pixel_attention_mask=mask)
    if "pixel_mask" in forward:
        yield dict(pixel_values=pixels(batch, channels, size, size), pixel_mask=torch.ones(batch, size, size))


def _tokens_per_image(features, batch: int) -> list[int]:
    """How many image-token embeddings ``get_image_features`` made for each sequence's image."""
    for name in ("pooler_output", "last_hidden_state"):
        if getattr(features, name, None) is not None:
            features = getattr(features, name)
            break
    if torch.is_tensor(features):
        return [features.numel() // features.shape[-1] // batch] * batch
    per = [f.numel() // f.shape[-1] for f in features]
    return per if len(per) == batch else [sum(per) // batch] * batch


def image_inputs(model, seed: int):
    """``(input_ids, labels, pixel keyword arguments)`` with one image per sequence for a vision-language
    model (None for a text-only one): the first pixel layout its ``get_image_features`` and forward take, as
    many image tokens as the features it makes, the image tokens' labels ignored (as the processors set
    them). Raises :class:`NoImageInput` when no layout works."""
    if getattr(model.config, "vision_config", None) is None:
        return None
    g, batch = torch.Generator().manual_seed(seed), 2
    forward = inspect.signature(model.forward).parameters
    if {"aspect_ratio_ids", "cross_attention_mask"} <= set(forward):
        return _cross_attention_image(model, batch, g)
    if not hasattr(model, "get_image_features"):
        raise NoImageInput("no image input built here: the model has no get_image_features")
    tried = []
    for pixel_kwargs in _image_layouts(model, batch, g):
        try:
            with torch.no_grad():
                counts = _tokens_per_image(model.get_image_features(**pixel_kwargs), batch)
            text = torch.randint(SPECIAL, VOCAB, (batch, 5), generator=g).tolist()
            width = max(counts) + 5
            rows = [t[:2] + [IMAGE_TOKEN] * n + t[2:] + [t[-1]] * (width - 5 - n) for t, n in zip(text, counts)]
            ids = torch.tensor(rows)
            kwargs = dict(pixel_kwargs)
            for name in ("token_type_ids", "mm_token_type_ids"):
                if name in forward:
                    kwargs[name] = (ids == IMAGE_TOKEN).long()
            labels = ids.masked_fill(ids == IMAGE_TOKEN, -100)
            labels[0, :1] = -100
            with torch.no_grad():
                model(input_ids=ids, labels=labels, use_cache=False, **kwargs)
            return ids, labels, kwargs
        except Exception as exc:  # noqa: BLE001  (the next layout)
            tried.append(f"{type(exc).__name__}: {str(exc).splitlines()[0][:60] if str(exc) else ''}")
    raise NoImageInput(f"no image input built here ({len(tried)} layouts tried; the first: {tried[0]})")


def _cross_attention_image(model, batch: int, g):
    """Mllama's layout: the text attends to the image's tiles through cross-attention, so each sequence holds
    one image token and the tokens from it on see the image (``cross_attention_mask``, as the processor sets
    it); one image per sequence, cut into the vision config's largest number of tiles (its 1x1 aspect ratio,
    the other tiles masked out as the processor pads them)."""
    vision = model.config.vision_config
    tiles, size, channels = vision.max_num_tiles, vision.image_size, vision.num_channels
    text = torch.randint(SPECIAL, VOCAB, (batch, 7), generator=g)
    at = [1, 3][:batch]
    for row, pos in enumerate(at):
        text[row, pos] = IMAGE_TOKEN
    labels = text.masked_fill(text == IMAGE_TOKEN, -100)
    labels[0, :1] = -100
    sees = (torch.arange(text.shape[1])[None, :] >= torch.tensor(at)[:, None]).long()
    tile_mask = torch.zeros(batch, 1, tiles, dtype=torch.long)
    tile_mask[:, :, 0] = 1
    kwargs = dict(
        pixel_values=torch.randn(batch, 1, tiles, channels, size, size, generator=g, dtype=torch.float64),
        aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long),  # 1: the first supported ratio, 1x1
        aspect_ratio_mask=tile_mask,
        cross_attention_mask=sees[:, :, None, None] * tile_mask[:, None, :, :],
    )
    try:
        with torch.no_grad():
            model(input_ids=text, labels=labels, use_cache=False, **kwargs)
    except Exception as exc:  # noqa: BLE001  (the reason is the answer)
        raise NoImageInput(f"no image input built here (cross-attention tiles: {type(exc).__name__}: {exc})") from None
    return text, labels, kwargs


def _run(model, ids, seed: int = 0, **kwargs):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # patched and unpatched draw the same noise (PhiMoE's router samples in training)
    out = model(input_ids=ids, use_cache=False, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def float64_loss(logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):  # fmt: skip
    """transformers' ``ForCausalLMLoss`` without its upcast to float32 (which would round a float64 model's
    logits): the unpatched models' loss in the equivalence test (``tests/test_hf_models.py`` checks it equals
    ``ForCausalLMLoss`` bit for bit on float32 logits)."""
    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits, target = logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device)
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    if reduction == "sum":
        den = num_items_in_batch
        loss = loss / (den.to(loss.device) if torch.is_tensor(den) else den)
    return loss


class _UpcastLogits(torch.Tensor):
    """A float64 model's logits whose ``.float()`` -- the fp32 upcast some heads apply
    (``self.lm_head(h).float()``), as transformers' loss does to every model's logits -- keeps float64, as
    :func:`float64_loss` keeps its own: in float32 / bf16 / fp16, the dtypes models train in, that upcast is the
    loss's own, so the float64 test compares the math without either rounding."""

    def float(self, *args, **kwargs):
        if args or kwargs or self.dtype != torch.float64:
            return super().float(*args, **kwargs)
        return self.as_subclass(torch.Tensor)


def _keep_float64(module, args, output):
    return output.as_subclass(_UpcastLogits) if torch.is_tensor(output) else output


def compare(model_type: str, seed: int = 0, overrides: dict | None = None) -> dict:
    """Patched vs unpatched on a tiny float64 ``model_type``: the largest relative difference of the loss and
    of every parameter's gradient in each case (labels; ``num_items_in_batch``; pre-shifted ``shift_labels``
    with ``logits_to_keep``; for a vision-language model, an image per sequence), and whether the patched
    output's logits were None.  Raises what the model raises (:class:`Unbuildable` when it cannot be built
    small, :class:`NoImageInput` when a vision-language model gets no image input)."""
    import copy

    from .. import transformers as hf

    model = build(model_type, seed, overrides)
    patched = hf.apply(copy.deepcopy(model), _tested=False)
    model._loss_function = float64_loss  # what ``model.loss_function`` returns when set
    model.get_output_embeddings().register_forward_hook(_keep_float64)
    ids, labels = _inputs(model, seed)
    shift = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    cases = {
        "labels": (ids, dict(labels=labels)),
        "num_items_in_batch": (ids, dict(labels=labels, num_items_in_batch=torch.tensor(5))),
        "shift_labels + logits_to_keep": (
            ids,
            dict(labels=labels, shift_labels=shift[:, -3:].contiguous(), logits_to_keep=3),
        ),
    }
    if "logits_to_keep" not in inspect.signature(model.forward).parameters:  # a forward that keeps every position
        cases["shift_labels"] = (ids, dict(labels=labels, shift_labels=shift.contiguous()))
        del cases["shift_labels + logits_to_keep"]
    errors, no_logits, reached = {}, True, {}

    def check(name, ids, kwargs):
        nonlocal no_logits
        want, want_grads = _run(model, ids, seed, **kwargs)
        got, got_grads = _run(patched, ids, seed, **kwargs)
        reached[name] = {k for k, g in want_grads.items() if g.abs().max() > 0}
        no_logits &= got.logits is None
        worst = (got.loss - want.loss).abs().item() / max(want.loss.abs().item(), 1e-30)
        if set(got_grads) != set(want_grads):
            raise AssertionError(f"{name}: gradients of {sorted(set(got_grads) ^ set(want_grads))} differ in presence")
        for key, g in want_grads.items():
            scale = max(g.abs().max().item(), 1e-30)
            worst = max(worst, (got_grads[key] - g).abs().max().item() / scale)
        errors[name] = worst
        return want

    for name, (ids, kwargs) in cases.items():  # text first: a model failing on its own fails here
        want = check(name, ids, kwargs)
    image = image_inputs(model, seed)
    if image is not None:
        image_ids, image_labels, pixels = image
        cases["image"] = (image_ids, dict(labels=image_labels, **pixels))
        want = check("image", *cases["image"])
    if "image" in cases and not reached["image"] - reached["labels"]:
        raise NoImageInput("the image input reaches no parameter the text alone does not (the vision tower)")
    aux = getattr(want, "aux_loss", None)
    return {"errors": errors, "logits_none": no_logits, "aux_loss": aux is not None}


def outcome(model_type: str) -> tuple[str, str, dict]:
    """``("verified" | "refused" | "unbuildable", reason, the overrides of SMALL it was built with)`` of the
    equivalence test on ``model_type`` (a type the structural rule accepts), trying :data:`VARIANTS` in turn
    while the tiny instance cannot be built or fails on its own (unbuildable every way: the default build's reason)."""
    first = None
    for overrides in VARIANTS:
        status, reason = _outcome(model_type, overrides)
        if status != "unbuildable":
            return status, reason, overrides
        first = first or (status, reason, overrides)
    assert first is not None  # VARIANTS is not empty
    return first  # unbuildable every way: the reason the default build gave


def _outcome(model_type: str, overrides: dict) -> tuple[str, str]:
    try:
        result = compare(model_type, overrides=overrides)
    except Unbuildable as exc:
        return "unbuildable", str(exc)
    except Exception as exc:  # noqa: BLE001  (the reason is the answer)
        first = str(exc).splitlines()[0] if str(exc) else ""
        if isinstance(exc, ValueError) and first.startswith("memops"):  # refused on the instance
            return "refused", first.split(": ", 1)[-1][:300]
        return "unbuildable", f"the tiny instance fails on its own: {type(exc).__name__}: {first[:200]}"
    worst = max(result["errors"].values())
    if not worst <= TOLERANCE or not result["logits_none"]:
        where = ", ".join(f"{k} {v:.1e}" for k, v in result["errors"].items())
        return "refused", f"differs from the unpatched model in float64 (relative: {where})"
    return "verified", ""
