"""scTAPE (PyPI ``scTAPE`` 1.1.2, import ``TAPE``) behind one wall: bulk checks, training, prediction.

TAPE's ``Deconvolution(simulated, bulk, datatype="TPM", mode="overall", ...)`` is, in order:
``ProcessInputData`` (counts->TPM of the *simulated* data only, a variance filter on both
tables, gene intersection, log(x+1), per-sample min-max), ``reproducibility(seed)``,
``train_model`` and ``predict``. This module calls TAPE's own ``generate_simulated_data``,
``reproducibility``, ``train_model``, ``AutoEncoder`` and ``adaptive_stage`` in that order and
re-implements only the preprocessing, so that a saved checkpoint can predict new bulks.
``tests/test_deconvolution.py`` checks the result equals ``TAPE.Deconvolution`` on the same data.

TAPE's sharp edges, each walled off here:

- importing ``TAPE.model`` runs ``warnings.filterwarnings("ignore")`` process-wide
  -> imported inside ``warnings.catch_warnings()`` (:func:`import_tape`);
- it mutates the frames it is given -> it only ever gets copies;
- ``generate_simulated_data`` fails on an in-memory AnnData -> it gets a DataFrame;
- ``Deconvolution`` hard-codes ``samplenum=5000`` for a DataFrame reference, pickles the whole
  module (``torch.save(model)``) and, with ``adaptive=True`` and no ``save_model_name``, writes
  ``model.pth`` into the cwd and reloads it with a ``torch.load`` that fails on torch >= 2.6
  -> we never call ``Deconvolution``/``predict``; the model stays in memory and is saved as a
  plain ``state_dict`` (:func:`checkpoint_dict`, loaded with ``weights_only=True``);
- it writes files into the cwd -> it runs in a scratch folder inside the output folder
  (:func:`tape_sandbox`), which is removed afterwards;
- it calls ``sns.set()`` and opens figures it never closes -> ``matplotlib.rc_context`` and
  closing every figure it opened;
- its ``print`` calls -> logged at DEBUG;
- torch threads -> set explicitly for the call and restored;
- ``datatype="TPM"`` converts only the simulated data -> :func:`prepare_bulk` makes the bulk TPM;
- ``datatype="TPM"`` divides the simulated *UMI* counts by gene length, which UMI counts do not
  carry (one count = one molecule), while a real bulk's TPM has its read-length bias removed: the
  two disagree by the gene length on every gene. Fixed in two steps. (1) Every table is first
  brought to transcripts per million as its protocol requires: UMI counts (the reference's
  simulated bulks with ``reference_protocol="umi"``, pseudo-bulks of UMI cells) -> CPM;
  full-length read counts -> TPM with gene lengths (:func:`prepare_bulk` tells bulk counts of
  the two kinds apart from the data). (2) All of them then get the *same* TAPE input scale,
  :func:`model_scale` (TPM / gene length, renormalised: exactly what datatype="TPM" makes of UMI
  counts), so a UMI reference with UMI pseudo-bulks is TAPE's own computation, and a real bulk
  now gets the same per-gene scaling as the reference instead of one length less;
- its variance filter over bulk samples is NaN for a single bulk sample and drops every gene
  -> with one bulk sample that filter is skipped (documented deviation);
- it reseeds numpy/torch's global generators (every adaptive step) -> states restored;
- glibc heap fragmentation makes RSS climb ~0.2 GB/epoch -> ``bound_heap_fragmentation()``.
"""

from models.bulk import PROTOCOLS  # noqa: F401  (callers read tape.PROTOCOLS)
from models.deconvolution.units import (  # noqa: F401
    BULK_PROTOCOLS, LENGTH_SLOPE_CUTOFF, MODEL_SCALE, UNITS, BulkReport, align_genes, check_bulk_values,
    decide_protocol, marker_genes, model_scale, orient_bulk, prepare_bulk, read_table, reference_profile, scale_samples,
    select_genes)
from models.deconvolution.tape import (  # noqa: F401
    ADAPTIVE_MAX_ITER, ADAPTIVE_STEP, GENE_SELECTIONS, MEMBER_DATA, TAPE_VERSION, TapeFit, TapeSettings, bootstrap_reference, calibration_bulks, checkpoint_dict,
    checkpoint_calibration, checkpoint_halfwidth, checkpoint_library, checkpoint_profile,
    checkpoint_protocol, fit_tape, import_tape, load_checkpoint, model_from_checkpoint, models_from_checkpoint,
    model_inputs, predict_members, predict_proportions, reconstruction,
    predict_scaled, save_checkpoint, simulate_bulks, simulated_tpm, tape_sandbox)
from models.deconvolution.content import content_weights, read_cell_content, reference_library, to_cell_content  # noqa: F401
from models.deconvolution.signature import nnls_proportions  # noqa: F401
from models.deconvolution.intervals import (DEPARTURE_TAIL, LEVEL, conformal_halfwidth, coverage,  # noqa: F401
                                             departure_halfwidth, departure_scores, ensemble_scale, intervals,
                                             read_departure)
