"""The paper's analyses of how a ViT builds its classes, as a library.

Every analysis takes ``model`` and ``data`` (a tensor batch, an ``(images, labels[, masks])``
tuple, a dataset or any iterable of such batches, e.g. a ``DataLoader``; see
:mod:`._stream`), accumulates batch by batch in bounded memory, and returns a result with
``to_dict()`` (JSON-safe), ``table()`` (markdown) and ``plot()`` (matplotlib).

Example:
    >>> from class_space_saliency import analysis
    >>> result = analysis.identifiability(model, (images, labels), components="residual")
    >>> result["residual"].token_rate.shape  # one identifiability rate per block
    torch.Size([3])
"""

from ..probing import LinearProbes
from ._result import AnalysisResult
from ._stream import Batch, RankHistogram, stream
from .identifiability import (
    Identifiability,
    IdentifiabilityResult,
    class_identifiability,
    identifiability,
)
from .interventions import (
    KnockoutResult,
    PatchingResult,
    Site,
    attention_knockout,
    knockout,
    patch,
    patching_grid,
)
from .memories import (
    KeyValueAgreementResult,
    ValueVectorClasses,
    ValueVectorsResult,
    key_value_agreement,
    value_vector_classes,
    value_vectors,
)
from .probes import LinearProbesResult, linear_probes
from .report import ANALYSES, AnalysisReport, AnalysisSpec, run_analyses

__all__ = [
    "ANALYSES",
    "AnalysisReport",
    "AnalysisResult",
    "AnalysisSpec",
    "Batch",
    "Identifiability",
    "IdentifiabilityResult",
    "KeyValueAgreementResult",
    "KnockoutResult",
    "LinearProbes",
    "LinearProbesResult",
    "PatchingResult",
    "RankHistogram",
    "Site",
    "ValueVectorClasses",
    "ValueVectorsResult",
    "attention_knockout",
    "class_identifiability",
    "identifiability",
    "key_value_agreement",
    "knockout",
    "linear_probes",
    "patch",
    "patching_grid",
    "run_analyses",
    "stream",
    "value_vector_classes",
    "value_vectors",
]
