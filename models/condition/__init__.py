"""Conditioning the generator on a bulk sample's expression, not only its proportions.

Without it, two bulks of the same composition (one from resting, one from stimulated cells)
give the same cells. Here each bulk sample s gets, per cell type k, a shift that makes the
expected pseudo-bulk of its generated cells reproduce the bulk:

    log E[mean count of gene g in a type-k cell of sample s]
        = log m_kg(z + u_sk)  +  d_kg  +  e_sg

- ``m_kg(z + u_sk)``: the frozen decoder's mean (with stage 3's calibration), averaged over
  fixed draws of the type's z prior moved by a latent shift ``u_sk`` [K, Z]. The shift is
  penalised by its Mahalanobis length under the type's prior, so a type's cells stay that type
  (the GMVAE's own assignment pi is checked on the conditioned cells);
- ``e_sg``: a per-sample, per-gene log factor shared by every type (what one bulk identifies
  best: the sample's overall change of each gene);
- ``d_kg``: a per-type, per-gene deviation from that shared factor, fitted jointly over all the
  samples given together (the regression behind CIBERSORTx high resolution and bMIND:
  bulk_s(g) ~ sum_k n_sk mu_k(g) exp(delta_kg)); proportions that vary across samples make it
  identifiable. It is shrunk to zero (a ridge), so with one bulk, or a type too rare to be seen,
  it falls back to the shared factor.

The fit matches log(profile + PSEUDO) over the genes the bulk and the model share, where a
profile is expression normalised to sum 1 over those genes (so library size and sequencing depth
drop out; UMI counts, CPM or TPM all work):

- **absolute**: the bulk's own profile (a bulk from the reference's platform);
- **relative**: the model's unshifted pseudo-bulk of a baseline, times the ratio of the sample's
  profile to the baseline's (a ``BULK_BASELINE`` of control samples, or the cohort's mean).
  Gene-wise platform factors (length bias, capture efficiency) cancel in the ratio.

Before the fit, what each gene's residual owes to sampling (the bulk's cells, its depth, the
model's own training cells) is thresholded away (:func:`log_profile_noise`,
:func:`denoise_targets`), so the reference's own bulk asks for almost no change.

Pure functions on tensors and arrays; stage 5 does the I/O. Seeded: the same generator seed
gives the same fit.
"""
from models.condition.fit import (CONTRACTION, MODES, ConditionSettings, SampleCondition, fit_conditions, fit_genes,
                                  fit_latent)
from models.condition.model import (expected_log_means, latent_draws, prior_whitener, type_log_means,
                                    type_moments)
from models.condition.stage import align_samples, choose_mode, own_type_share, save_npz, top_shifted_genes
from models.condition.targets import (bulk_depths, bulk_profiles, denoise_targets, fit_composition, log_profile,
                                      log_profile_noise, offset_of, pearson, pseudo_bulk_profile, relative_targets)

__all__ = [
    "CONTRACTION", "MODES", "ConditionSettings", "SampleCondition", "align_samples", "bulk_depths", "bulk_profiles",
    "choose_mode", "denoise_targets", "expected_log_means", "fit_composition", "fit_conditions", "fit_genes",
    "fit_latent", "latent_draws", "log_profile", "log_profile_noise", "offset_of", "own_type_share", "pearson",
    "prior_whitener", "pseudo_bulk_profile", "relative_targets", "save_npz", "top_shifted_genes",
    "type_log_means", "type_moments",
]
