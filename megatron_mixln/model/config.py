"""The model's typed config. Field names follow Megatron-LM's flags (--hidden-size -> hidden_size)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from megatron_mixln.kernels.add_norm import POINTWISE_IMPLS, POINTWISE_KINDS
from megatron_mixln.model.positions import (POSITIONS, QKV_NORM_POSITIONS, TWO_STREAM, ZOO_POSITIONS, format_positions,
                                            resolve_positions, select_layers)
from megatron_mixln.model.presets import preset
from megatron_mixln.model.two_stream import SIAMESE_VARIANTS

NORMALIZATIONS = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm", "dyt": "DyT", "derf": "Derf"}  # kind -> flag value
QK_NORMS = ("none", "head", "full")
# DyT's LLaMA initial alphas (attention, FFN, final norms): jiachenzhu/DyT other_tasks/LLaMA, its 7B
# command (its smallest size; 13B uses 0.6,0.15,0.15, 34B/70B 0.2,0.05,0.05; its config default is 1,1,1).
DYT_ALPHA_INIT = "0.8,0.2,0.2"


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
    # --- linear biases (Megatron-LM's flags; all off: LLaMA has none) ---
    add_qkv_bias: bool = _help("bias on the q, k, v projections only (Megatron-LM --add-qkv-bias; Qwen2)", default=False)
    add_bias_linear: bool = _help("bias on every attention and MLP linear: q, k, v, o, gate, up, down (Megatron-LM "
                                  "--add-bias-linear; HF attention_bias + mlp_bias)", default=False)
    add_output_layer_bias: bool = _help("bias on the LM head (Megatron's output_layer; no peer has a flag for it)",
                                        default=False)
    # --- norms and their positions ---
    normalization: str = _help("RMSNorm, LayerNorm, or the pointwise DyT / Derf (no statistics)", default="RMSNorm")
    norm_epsilon: float = _help("epsilon of every norm", default=1e-6)
    norm_position: str = _help(
        f"one of {', '.join(POSITIONS)}, 'mix' (Mix-LN), 'hybridnorm-star' (HybridNorm*), or a per-layer list such as 'post*3,pre*9'", default="pre"
    )
    post_ln_layers: int | None = _help("mix: number of leading Post-LN layers k (overrides the fraction)", default=None)
    post_ln_fraction: float = _help("mix: k = floor(fraction * num_layers)", default=0.25)
    final_norm: bool = _help("norm before the LM head", default=True)
    qk_norm: str = _help("norm of q and k before RoPE: none, head (over each head's head_dim, Qwen3) or full "
                         "(over the whole q / k projection, OLMo 2)", default="none")
    qk_norm_per_head_gain: bool = _help("head QK-norm (and HybridNorm's q/k/v norms): one gain per head instead "
                                        "of one shared by all heads", default=False)
    hybrid_ffn_residual_after_norm: bool = _help(
        "hybrid layers' FFN: u = N(h); y = u + FFN(u) (HybridNorm's code, ffn_residual_after_norm); "
        "--no-hybrid-ffn-residual-after-norm: textbook Post-Norm y = N(h + FFN(h))", default=True)
    dyt_alpha_init: str = _help("DyT/Derf: initial alpha of the attention, FFN and final norms "
                                "(DyT's LLaMA code)", default=DYT_ALPHA_INIT)
    dyt_bias: bool = _help("DyT: add the bias beta (the paper's general form; its LLaMA code has none)",
                           default=False)
    learnable_embedding_scale: bool = field(default=False, metadata={  # resolved by flag_defaults (below)
        "help": "multiply the embedding output by a learnable scalar initialised to sqrt(hidden size) (DyT's LLaMA "
                "and Derf's GPT-2 code, shared_scale); default: on with --normalization DyT or Derf, off otherwise",
        "flag_default": "on with DyT/Derf, else off"})
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
            raise ValueError("hidden_size/num_attention_heads: head dim must be even for RoPE")
        name = NORMALIZATIONS.get(self.normalization.lower())
        if name is None:
            raise ValueError(f"--normalization: unknown {self.normalization!r}; allowed: {', '.join(NORMALIZATIONS.values())}")
        self.normalization = name
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
        self._check_zoo_options()
        self._resolve_layer_options()

    def _check_zoo_options(self) -> None:
        """QK-norm and the pointwise kinds (docs/norm-zoo.md): values, and what they cannot combine with."""
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"--qk-norm: unknown {self.qk_norm!r}; allowed: {', '.join(QK_NORMS)}")
        self.dyt_alpha_inits  # parses, or raises naming the flag
        pointwise = self.norm_kind in POINTWISE_KINDS
        if pointwise and self.qk_norm == "full":
            raise ValueError(f"--qk-norm: 'full' (statistics over the whole projection) has no meaning for the pointwise "
                             f"--normalization {self.normalization}; use --qk-norm head (with --qk-norm-per-head-gain "
                             "for one gain per channel)")
        if pointwise and self.norm_impl not in POINTWISE_IMPLS:
            raise ValueError(f"--norm-impl: {self.norm_impl!r} has no {self.normalization} kernel; allowed with "
                             f"--normalization {self.normalization}: {', '.join(POINTWISE_IMPLS)}")
        if self.dyt_bias and self.norm_kind != "dyt":
            raise ValueError(f"--dyt-bias: only applies to --normalization DyT (Derf and LayerNorm always have a bias), "
                             f"not {self.normalization}")
        if self.qk_norm == "full" and any(p in QKV_NORM_POSITIONS for p in self.positions):
            raise ValueError("--qk-norm: 'full' conflicts with the hybrid positions' own per-head q/k/v norms "
                             f"(positions {format_positions(self.positions)}); use --qk-norm none or head")

    @staticmethod
    def flag_defaults(given: dict) -> dict:
        """`given` (field values from flags or a config file) plus the defaults that depend on another flag:
        --learnable-embedding-scale is on with --normalization DyT or Derf (their code's choice). Resolved at
        the command line, not in the dataclass, so a config dict stored before the field existed (an old
        DyT checkpoint) still loads as the model it was (the field's default, False)."""
        out = dict(given)
        if "learnable_embedding_scale" not in out:
            out["learnable_embedding_scale"] = str(out.get("normalization", "RMSNorm")).lower() in POINTWISE_KINDS
        return out

    def zoo_options(self) -> list[str]:
        """The norm-zoo flags this model uses (docs/norm-zoo.md), as 'flag value' strings; [] for none."""
        out = [f"--norm-position {p}" for p in dict.fromkeys(self.positions) if p in ZOO_POSITIONS]
        if self.qk_norm != "none":
            out.append(f"--qk-norm {self.qk_norm}")
        if self.norm_kind in POINTWISE_KINDS:
            out.append(f"--normalization {self.normalization}")
        if self.learnable_embedding_scale:
            out.append("--learnable-embedding-scale")
        return out

    @property
    def dyt_alpha_inits(self) -> tuple[float, float, float]:
        """(attention, FFN, final) initial alpha of the DyT/Derf norms, from --dyt-alpha-init."""
        try:
            values = tuple(float(v) for v in str(self.dyt_alpha_init).split(","))
        except ValueError:
            values = ()
        if len(values) != 3:
            raise ValueError(f"--dyt-alpha-init: expected three numbers 'attn,ffn,final' such as {DYT_ALPHA_INIT!r}, "
                             f"got {self.dyt_alpha_init!r}")
        return values

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
        """rmsnorm, layernorm, dyt or derf (the kernels' kind names)."""
        return self.normalization.lower()

    @property
    def qkv_bias(self) -> bool:
        """Whether q, k and v have a bias (--add-qkv-bias or --add-bias-linear)."""
        return self.add_qkv_bias or self.add_bias_linear

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
