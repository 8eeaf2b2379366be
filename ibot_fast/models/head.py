"""iBOT projection head (docs/reference-semantics.md#head).

    tokens [.., D] --mlp--> [.., bottleneck] --L2 normalise--> z --last_layer(s)--> logits

* `mlp`: Linear(D, hidden) -> GELU -> (Linear(hidden, hidden) -> GELU) × (nlayers - 2)
  -> Linear(hidden, bottleneck); trunc-normal(0.02) weights, zero biases. Module indices
  (mlp.0, mlp.2, mlp.4) match the reference's state-dict keys.
* `last_layer`: bias-free weight-normalised Linear(bottleneck, K) for the [CLS] token;
  `last_layer2` for the patch tokens, either the same module (shared_head) or a separate
  Linear(bottleneck, K2).

With norm_last_layer (g frozen at 1) every logit is a cosine similarity between z and one of
K prototype directions, so it lies in [-1, 1].
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from ibot_fast.models.vit import init_linear


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight normalisation: W[k] = g[k] · v[k] / ||v[k]||.

    Parameters are `weight_g` [out, 1] and `weight_v` [out, in], the names and shapes of the
    legacy `nn.utils.weight_norm(nn.Linear(in, out, bias=False))`, so reference checkpoints
    load 1:1. The norm is taken over the input dim, one per output row, with no epsilon
    (as torch's weight_norm; a zero row of v would give NaN there as well).
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # v starts as a freshly initialised nn.Linear weight (kaiming-uniform), drawn from the
        # random stream exactly like the reference's nn.Linear inside weight_norm.
        v = nn.Linear(in_features, out_features, bias=False).weight.detach()
        # registered g first, v second: the legacy weight_norm's state-dict order
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.weight_v = nn.Parameter(v.clone())

    def weight(self):
        """The effective weight g · v / ||v||_row, [out, in]."""
        v = self.weight_v
        return v * (self.weight_g / v.norm(dim=1, keepdim=True))

    def forward(self, x):
        return F.linear(x, self.weight())

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


class IBOTHead(nn.Module):
    def __init__(self, in_dim, out_dim, patch_out_dim=8192, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256, norm_last_layer=True, shared_head=False):
        super().__init__()
        if bottleneck_dim <= 0:
            raise ValueError(f"bottleneck_dim must be positive, got {bottleneck_dim}")
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        # Init the MLP before the last layers exist: their v keeps the default Linear init.
        self.apply(self._init_weights)

        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False
        if shared_head:
            # Same module object: named_parameters() lists it once, state_dict() has both the
            # last_layer.* and last_layer2.* keys (as in the reference).
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormLinear(bottleneck_dim, patch_out_dim)
            if norm_last_layer:
                self.last_layer2.weight_g.requires_grad = False
        self.shared_head = shared_head

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            init_linear(m)

    def bottleneck(self, x):
        """L2-normalised bottleneck vectors z = mlp(x) / ||mlp(x)||: [..., D] -> [..., bottleneck].

        F.normalize's default eps (1e-12) guards a zero vector, as in the reference.
        """
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def forward(self, x):
        """x [B, T, D] -> ([CLS] logits [B, K], patch logits [B, T-1, K2]); x [B, D] -> [B, K]."""
        if x.ndim not in (2, 3):
            raise ValueError(f"IBOTHead expects [B, D] or [B, T, D] input, got {tuple(x.shape)}")
        z = self.bottleneck(x)
        if x.ndim == 2:
            return self.last_layer(z)
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])
