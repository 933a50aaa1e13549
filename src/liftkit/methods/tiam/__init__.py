r"""TIAM: triple-inertial accelerated alternating minimization, and its un-accelerated base ``am``.

Paper: C. Yan, J. Xu, Q. Wang, Z. Peng, "A Triple-Inertial Accelerated Alternating Optimization Method for
Deep Learning Training", arXiv 2503.08489. No code was released; only the paper's template is public, so this
package is the reconstruction of docs/methods/tiam.md §3–§5 on the base objective of mDLAM (Wang, Li, Zhao,
Neurocomputing 2022). Results are reported as "TIAM (reconstructed from the paper's template)".

Objective (docs/methods/tiam.md §3; written row-major here, one sample per row, weights stored as in ``nn.Linear``):

.. math::

    F(W,b,z,a) = \mathrm{CE}_{\mathrm{sum}}(y, z_L)
        + \sum_{l=1}^{L} \Big[\tfrac{\rho}{2}\|z_l - a_{l-1}W_l^\top - 1b_l^\top\|^2
        + \tfrac{\mu}{2}\|W_l\|^2\Big],
    \qquad (z_l, a_l) \in C_l(\varepsilon) = \{h(z_l) - \varepsilon \le a_l \le h(z_l) + \varepsilon\}

with a_0 = x and ε_k = max(ε_0 · decay^k, ε_min). The alternative ``constraint='penalty'`` replaces C_l(ε) by
(ν/2)‖a_l − h(z_l)‖².

Every block u ∈ {W_l, b_l, z_l, a_l, z_L} (in that order, layer by layer; docs/methods/tiam.md §4.5) takes one
triple-inertial step with Δ = u^k − u^{k−1}:

.. code-block:: text

    ũ = u^k + p1 Δ    (centre of the proximal term)      û = u^k + p2 Δ    (gradient point)
    u⁺ = prox_{P_u/θ}(ũ − ∇S_u(û)/θ)   accepted iff  S_u(u⁺) ≤ S_u(û) + ⟨∇S_u(û), u⁺ − û⟩ + θ/2 ‖u⁺ − û‖²
         (θ ← factor·θ from θ0, at most ``max_doublings`` times; then retry with p1 = p2 = 0; then keep u^k)
    u^{k+1} = u⁺ + p3 (u⁺ − u^k)       (what every later block sees)

* W_l: S = (ρ/2)‖z_l − a W^T − 1bᵀ‖² + (μ/2)‖W‖², no prox, backtracking. S is quadratic, so the acceptance
  test is evaluated exactly from three inner products (no extra pass over the data per trial).
* b_l: exact step θ = ρN: b⁺ = b̃ − mean_rows(aWᵀ + 1b̂ᵀ − z); with p1 = p2 it is the exact minimiser.
* z_l (l < L): θ = ρ: z⁺ = Π(z̃ − ẑ + v), v = aWᵀ + 1bᵀ, Π the projection onto {z : h(z) ∈ [a_l ± ε]}
  (ReLU: z = min(v', a + ε), then max(z, a − ε) where a − ε > 0; strictly increasing h: a clip to
  [h⁻¹(a − ε), h⁻¹(a + ε)]). Penalty variant: the two-candidate closed form (ReLU, leaky ReLU).
* a_l (l < L): S = (ρ/2)‖z_{l+1} − aW_{l+1}ᵀ − 1b_{l+1}ᵀ‖², prox = box [h(z_l) ± ε], backtracking.
* z_L: S = CE_sum, prox of (ρ/2)‖z − v_L‖²: z⁺ = (θw + ρv_L)/(θ + ρ); or ``zL_solver='fista'`` (mDLAM): FISTA
  on the whole z_L subproblem from z̃.

Metrics (assumption, switchable; the Gram metrics are the default, the paper's Euclidean step the ``paper``
preset). The W and a steps are gradient steps on ill-conditioned least-squares blocks (the Hessian of S_W is ρaᵀa +
μI, whose spectrum on MNIST pixels spans many decades), so with the identity metric θ settles near the largest
eigenvalue and the weights move along the small ones very slowly. ``w_metric='diagonal'`` runs the same
backtracking in the metric M = diag(ρΣ_rows a² + μ) (still no matrix inversion); ``w_metric='gram'`` in M = ρaᵀa +
μI, the block's exact Hessian, and ``a_metric='gram'`` (penalty constraint only) in M = ρW_{l+1}ᵀW_{l+1} for a_l
with the prox u = (θwM + νh(z_l))(θM + νI)⁻¹: the step is u⁺ = prox^M(ũ − ∇S(û)M⁻¹/θ), accepted iff S(u⁺) ≤ S(û) +
⟨∇S(û), d⟩ + (θ/2)‖d‖²_M. With p1 = p2 the first trial θ = 1 is then the exact block minimiser (a Newton step on a
quadratic); the factorisations are of n_{l−1} × n_{l−1} and n_l × n_l matrices (784 × 784 for MNIST's first layer,
100 × 100 after it), which departs from the paper's "no matrix inversion" and is reported as such.

Cost (implementation, not the method). The W-metric is a Cholesky factor in float64; the first layer's, of the
fixed training set, is computed once in full-batch mode and reused while the input's fingerprint is unchanged. In
that metric the W acceptance test needs no pass over the data (ρ‖a Dᵀ‖² = ⟨D, G⟩ − δ‖D‖² for the direction
D = G M⁻¹), and a W^{k+1}ᵀ is formed as one product, which the next full-batch step's forward pass reuses while x
and W_1 are unchanged (bit for bit the product it would compute). The a-metric runs in the eigenbasis of
M = QΛQᵀ, where the direction, the prox and ‖d‖²_M are element-wise (see :mod:`~liftkit.methods.tiam.a_gram`).

Output penalty (assumption, switchable). ``rho_output`` weights the output layer's penalty (ρ_L/2)‖z_L − v_L‖²
separately (None: ρ, the spec). Minimising F over z_L leaves the Moreau envelope of CE with parameter 1/ρ_L at
the network's logits v_L: at a stationary point the error signal reaching W_L and a_{L−1} is y − softmax(z_L),
not y − softmax(v_L), and z_L may sit up to ‖y − softmax‖/ρ_L logits closer to the label than the network. A
small ρ_L therefore lets the auxiliary chain "classify" the training set while the network does not; a larger
ρ_L ties the loss to the network's own logits.

Exact output (assumption, switchable). ``output='exact'`` keeps the output constraint z_L = a_{L−1}W_Lᵀ + 1b_Lᵀ
exactly: there is no z_L block, CE acts on the logits of the auxiliary chain, and W_L, b_L and a_{L−1} take
majorised steps on it. The softmax cross-entropy's Hessian in the logits is at most ½I, so c·aᵀa + μI, c·N
and c·W_LᵀW_L (c = ``output_curvature``: 0.1 by default, ½ in the ``paper`` preset) take the place of ρaᵀa,
ρN and ρW_LᵀW_L in the metrics; with c = ½ the first trial θ = 1 is always accepted.

Block order (assumption, switchable). ``block_order='forward'`` is the paper's (layer by layer from the input:
W_l, b_l, z_l, a_l). ``'backward'`` runs l = L..1 with z_l, W_l, b_l, a_{l−1}: the label signal entering at
z_L then reaches W_1 within one sweep (as in dlADMM's backward pass) instead of one block per sweep.

Inertia schedule. ``p_schedule='constant'`` (the ``paper`` preset: p1 = p2 = p3 = 0.3, assumption) or ``'fista'``
(the default, with p3 alone switched on; the FISTA-like alternative of docs/methods/tiam.md §4.4): t_0 = 1,
t_k = (1 + √(1 + 4t_{k−1}²))/2 and every switched-on p_i of iteration k is p_k = (t_{k−1} − 1)/t_k
(0, 0, 0.28, 0.43, … → 1). The safeguard below keeps F monotone when the large late p_k overshoot.

After the third inertia z_l is re-projected (given a_l) and a_l (given the new z_l), so (z_l, a_l) ∈ C_l(ε).
With ``safeguard`` on, a block whose local objective (the terms of F that contain it) rises is redone with
p1 = p2 = p3 = 0, so F does not increase across the blocks of one sweep at fixed ε.

Modes. ``full`` (the paper's): the trainer passes the whole training set as one batch each step; the auxiliary
variables z_l, a_l, z_L and their previous iterates persist across steps, stored per dataset index (``idx``),
so a reshuffled batch stays aligned; ``resync_every`` = R > 0 (assumption; 0 by default) resets them and their
inertia to a forward pass of the current network every R iterations. ``minibatch``: the auxiliary variables
are fresh per batch (forward pass; z_L by ``zL_init``), ε restarts at ε_0 for each batch and decays per sweep,
``minibatch_sweeps`` sweeps run on each batch, and only the weights, biases and their inertia history persist
(assumption: the paper leaves mini-batching to future work). ``auto``: full when ``idx`` covers 0..max(idx)
exactly, otherwise minibatch.

``am`` is this same code with p1 = p2 = p3 = 0 ("AM (mDLAM base, p=0)"), so the acceleration is measured.

Data-parallel (docs/methods/tiam.md §7). Every rank holds its shard of the batch's columns of z_l, a_l and z_L
(in full mode: the same samples every epoch, since the trainer sorts the full batch before slicing it). Over
``self.comm`` go: the data part of the W-gradient ρ(aŴᵀ + 1bᵀ − z)ᵀa (n_l × n_{l−1}) and the three sample
sums of the W acceptance test; the b-step column sums Σ_rows(P + 1b̂ᵀ − z), divided by N_global; every
backtracking value (S(û), S(u⁺), ⟨∇S(û), d⟩, ‖d‖²) and every safeguard objective (with a feasibility count),
so θ and each accept / reject / restart decision are the same on every rank; and the sweep's objective terms
for the diagnostics. With ``output='exact'``, W_L and b_L are replicated blocks: their CE gradients are
all-reduced, and of their backtracking values only the CE share (S) is summed, since ⟨∇S, d⟩ and ‖d‖² are
already identical on every rank. ``zL_solver='fista'`` is single-process only (its stopping rule would need every
iteration's change reduced). Checkpoints gather the per-sample shards into full arrays.

Presets. The defaults are the ``tuned`` preset, the full-batch setting chosen on validation data (the penalty
constraint, the Gram metrics, the exact output, the third inertia on the ``fista`` schedule); ``paper`` is the
specification's (mDLAM's constants, the box constraint, Euclidean steps, constant p = 0.3); see
:mod:`~liftkit.methods.tiam.presets`.

Layout. ``config`` (the hyperparameters and the per-iteration schedules ε_k, p_k, ρ_k), ``state`` (the typed
state and its checkpoint form), ``ops`` (gradients, projections, backtracking), ``blocks``, ``a_gram`` and
``output`` (the block operators as functions of their operands and weights ρ, ν, c), ``presets``, ``sweep``
(the blocks bound to the method's state, the two sweep orders) and ``method`` (the thin ``TIAM`` and ``AM`` classes).
"""

from liftkit.methods.tiam.config import AMConfig, TIAMConfig
from liftkit.methods.tiam.method import AM, TIAM
from liftkit.methods.tiam.ops import grad_a, grad_b, grad_ce_sum, grad_w
from liftkit.methods.tiam.state import TIAMState

__all__ = ["AM", "TIAM", "AMConfig", "TIAMConfig", "TIAMState", "grad_a", "grad_b", "grad_ce_sum", "grad_w"]
