"""The paper's analyses of how a ViT builds its classes, as a library.

Every analysis takes ``model`` and ``data`` (a tensor batch, an ``(images, labels[, masks])``
tuple, a dataset or any iterable of such batches, e.g. a ``DataLoader``; see
:mod:`._stream`), accumulates batch by batch in bounded memory, and returns a result with
``to_dict()`` (JSON-safe), ``table()`` (markdown) and ``plot()`` (matplotlib).

- :func:`identifiability`: the label's rank per block, component and token group.
- :func:`logit_increment`, :func:`sublayer_changes`, :func:`residual_composition`
  (:mod:`.sublayers`): how each block and its attention and MLP sublayers move the label's
  logit and the top-1 class.
- :func:`context_identifiability`, :func:`context_removal` (:mod:`.context`, with object
  masks): object vs context tokens, and what remains when either is removed.
- :func:`knockout`, :func:`attention_knockout` (:mod:`.knockouts`): identifiability with image
  tokens attending only to themselves, or not to [CLS].
- :func:`patch`, :func:`patching_grid` (:mod:`.patching`): which activations of a clean run
  restore the label's logit in a corrupted one.
- :func:`value_vectors`, :func:`value_vector_classes`, :func:`key_value_agreement`
  (:mod:`.memories`): the sublayers as key-value memories in class space.
- :func:`linear_probes` (:mod:`.probes`): ridge probes against the projection.
- :func:`run_analyses` (:mod:`.report`): all of them into one report folder (``analyze``).

Example:
    >>> from class_space_saliency import analysis
    >>> result = analysis.identifiability(model, (images, labels), components="residual")
    >>> result["residual"].token_rate.shape  # one identifiability rate per block
    torch.Size([3])
"""

from ..probing import LinearProbes
from ._result import AnalysisResult
from ._stream import Batch, RankDifferenceHistogram, RankHistogram, stream
from .context import (
    ContextIdentifiabilityResult,
    ContextRemovalResult,
    RemovalOutcome,
    context_identifiability,
    context_removal,
)
from .identifiability import (
    Identifiability,
    IdentifiabilityResult,
    class_identifiability,
    identifiability,
)
from .knockouts import KnockoutResult, attention_knockout, knockout
from .memories import (
    KeyValueAgreementResult,
    ValueVectorClasses,
    ValueVectorsResult,
    key_value_agreement,
    value_vector_classes,
    value_vectors,
)
from .patching import PatchingResult, Site, other_class_partners, patch, patching_grid
from .probes import LinearProbesResult, linear_probes
from .report import ANALYSES, AnalysisReport, AnalysisSpec, run_analyses
from .sublayers import (
    LogitIncrementResult,
    ResidualCompositionResult,
    SublayerChangesResult,
    logit_increment,
    residual_composition,
    sublayer_changes,
)

__all__ = [
    "ANALYSES",
    "AnalysisReport",
    "AnalysisResult",
    "AnalysisSpec",
    "Batch",
    "ContextIdentifiabilityResult",
    "ContextRemovalResult",
    "Identifiability",
    "IdentifiabilityResult",
    "KeyValueAgreementResult",
    "KnockoutResult",
    "LinearProbes",
    "LinearProbesResult",
    "LogitIncrementResult",
    "PatchingResult",
    "RankDifferenceHistogram",
    "RankHistogram",
    "RemovalOutcome",
    "ResidualCompositionResult",
    "Site",
    "SublayerChangesResult",
    "ValueVectorClasses",
    "ValueVectorsResult",
    "attention_knockout",
    "class_identifiability",
    "context_identifiability",
    "context_removal",
    "identifiability",
    "key_value_agreement",
    "knockout",
    "linear_probes",
    "logit_increment",
    "other_class_partners",
    "patch",
    "patching_grid",
    "residual_composition",
    "run_analyses",
    "stream",
    "sublayer_changes",
    "value_vector_classes",
    "value_vectors",
]
