"""The model's typed config. Field names follow Megatron-LM's flags (--hidden-size -> hidden_size)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from megatron_mixln.model.positions import POSITIONS, TWO_STREAM, format_positions, resolve_positions, select_layers
from megatron_mixln.model.presets import preset
from megatron_mixln.model.two_stream import SIAMESE_VARIANTS

NORMALIZATIONS = {"rmsnorm": "rmsnorm", "layernorm": "layernorm"}


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    # --- shape ---
    vocab_size: int = _help("vocabulary size (rows of the embedding and LM head)", default=32000)
    hidden_size: int = _help("model width", default=512)
    ffn_hidden_size: int = _help("SwiGLU inner width", default=1368)
    num_layers: int = _help("number of transformer blocks", default=12)
    num_attention_heads: int = _help("query heads", default=8)
    num_query_groups: int | None = _help("key/value heads for grouped-query attention (default: = heads)", default=None)
    seq_length: int = _help("maximum sequence length", default=256)
    rotary_base: float = _help("RoPE base", default=10000.0)
    # --- norms and their positions ---
    normalization: str = _help("RMSNorm or LayerNorm", default="RMSNorm")
    norm_epsilon: float = _help("epsilon of every norm", default=1e-6)
    norm_position: str = _help(
        f"one of {', '.join(POSITIONS)}, 'mix' (Mix-LN), or a per-layer list such as 'post*3,pre*9'", default="pre"
    )
    post_ln_layers: int | None = _help("mix: number of leading Post-LN layers k (overrides the fraction)", default=None)
    post_ln_fraction: float = _help("mix: k = floor(fraction * num_layers)", default=0.25)
    final_norm: bool = _help("norm before the LM head", default=True)
    siamese_variant: str = _help(
        "SiameseNorm block, as the official code's MODEL_TYPE: post_pre (x normed before each sublayer, which "
        "sees N_in(x + N_y(y)); the DeiT/DiT code) or hybrid_pre (the attention sees c1*x + N_y(y), c1 a "
        "learnable gain; the OLMo code); see docs/two-stream.md", default="post_pre")
    # --- embedding, initialisation and per-layer options ---
    tie_embeddings: bool = _help("share the embedding and LM-head weights", default=False)
    init_method_std: float = _help("std of the normal init of linear and embedding weights", default=0.02)
    scaled_embedding_init: bool = _help("embedding std sqrt(2/5)=0.632, as the Mix-LN reference code", default=False)
    scaled_output_init: bool = _help("o_proj/down_proj std = init_method_std/sqrt(2L)", default=False)
    scaled_output_init_layers: str | None = _help(
        "scaled output init on these layers only: 'pre' (the Pre-LN layers: the reference's scale_post_pre), "
        "'post', 'all' or 1-based layers/ranges such as '4-12,14'", default=None)
    residual_gate_layers: str | None = _help(
        "learnable residual gates on these (pre/lns) layers: h = x + g_a*Attn(N(x)), y = h + g_m*MLP(N(h)); "
        "'all', 'pre' or '1-3,7' (the reference's scale_res_pre_norm is --norm-position pre with 'all')",
        default=None)
    residual_gate_init: float = _help("initial value of every residual gate (the reference's 0.001)", default=0.001)
    freeze_pad_embedding: bool = _help("zeroed, never-trained embedding row for --pad-token-id", default=False)
    pad_token_id: int | None = _help("padding token id (default 0: the pad id of T5's and this project's sentencepiece models)", default=None)
    # --- implementation ---
    norm_impl: str = _help("add+norm implementation: auto, torch, triton or apex", default="auto")
    cross_block_fusion: bool = _help(
        "fuse a pre/lns/peri layer's last residual add into the next layer's first norm (or the final norm)",
        default=True,
    )
    positions: tuple[str, ...] = field(init=False, repr=False)
    scaled_output_layers: tuple[int, ...] = field(init=False, repr=False)
    gated_layers: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "seq_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {getattr(self, name)!r}")
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.num_query_groups <= 0:
            raise ValueError(f"num_query_groups: must be a positive integer, got {self.num_query_groups}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size: {self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads: {self.num_attention_heads} is not divisible by "
                f"num_query_groups={self.num_query_groups}"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(f"hidden_size/num_attention_heads: head dim must be even for RoPE")
        kind = NORMALIZATIONS.get(self.normalization.lower())
        if kind is None:
            raise ValueError(f"normalization: unknown {self.normalization!r}; allowed: RMSNorm, LayerNorm")
        self.normalization = "RMSNorm" if kind == "rmsnorm" else "LayerNorm"
        if self.norm_epsilon <= 0 or self.init_method_std <= 0 or self.rotary_base <= 0:
            raise ValueError("norm_epsilon, init_method_std and rotary_base: must be positive")
        from megatron_mixln.kernels.add_norm import IMPLS

        if self.norm_impl not in IMPLS:
            raise ValueError(f"norm_impl: unknown {self.norm_impl!r}; allowed: {', '.join(IMPLS)}")
        self.positions = resolve_positions(
            self.norm_position, self.num_layers, self.post_ln_layers, self.post_ln_fraction
        )
        if not self.final_norm and self.positions[0] in TWO_STREAM:
            raise ValueError(f"--no-final-norm: norm position {self.positions[0]} needs its final norms (they "
                             "combine its two residual streams into the LM head's input); drop --no-final-norm")
        if self.siamese_variant not in SIAMESE_VARIANTS:
            raise ValueError(f"--siamese-variant: unknown {self.siamese_variant!r}; allowed: {', '.join(SIAMESE_VARIANTS)}")
        if self.siamese_variant != SIAMESE_VARIANTS[0] and self.positions[0] != "siamese":
            raise ValueError(f"--siamese-variant {self.siamese_variant}: only applies to --norm-position siamese "
                             f"(positions {self.positions_str}); drop it or use --norm-position siamese")
        self._resolve_layer_options()

    def _resolve_layer_options(self) -> None:
        """Per-layer options -> sorted 1-based layer tuples (decided once, read by init and Block)."""
        if self.scaled_output_init and self.scaled_output_init_layers:
            raise ValueError("scaled_output_init_layers: give it or scaled_output_init (all layers), not both")
        spec = "all" if self.scaled_output_init else self.scaled_output_init_layers
        self.scaled_output_layers = select_layers(spec, self.positions, "scaled_output_init_layers")
        self.gated_layers = select_layers(self.residual_gate_layers, self.positions, "residual_gate_layers")
        not_pre = [l for l in self.gated_layers if self.positions[l - 1] not in ("pre", "lns")]
        if not_pre:
            raise ValueError(f"residual_gate_layers: layers {not_pre} are not pre/lns layers (positions "
                             f"{self.positions_str}); gates scale the sublayer output added to an un-normalised "
                             "residual stream")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id: {self.pad_token_id} is outside the vocabulary [0, {self.vocab_size})")

    @property
    def pad_id(self) -> int:
        """The padding token id (--pad-token-id, default 0: T5's and this project's tokenizers' pad)."""
        return 0 if self.pad_token_id is None else self.pad_token_id

    @property
    def norm_kind(self) -> str:
        return self.normalization.lower()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def positions_str(self) -> str:
        return format_positions(self.positions)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """A preset's shape with any field overridden (vocab size, sequence length, a shape field...)."""
        return cls(**{**preset(name), **overrides})

    def replace(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}
