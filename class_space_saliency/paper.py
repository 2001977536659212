"""The paper's seven models by name: exact weights, how each is built, its official preprocessing.

Vilas, Schaumlöffel & Roig (NeurIPS 2023) analyse seven ViTs; the official code
(martinagvilas/vit-cls_emb, ``src/models/load.py``) names them ``vit_b_32``, ``vit_b_16``,
``vit_large_16``, ``vit_miil_16``, ``vit_gap_16``, ``vit_cifar_16`` and ``deit_ensemble_16``,
and so does :data:`PAPER_MODELS` here. It ran timm 0.6.12, whose bare model names loaded the
weights the tags below pin; timm 1.0 resolves two bare names to other weights
(:func:`paper_weights_warning`). :func:`~class_space_saliency.models.load_model` loads them as
``"paper:KEY"`` with the official preprocessing:

- the Hugging Face ``ViTImageProcessor`` of the in21k checkpoints (``google/vit-*-in21k``):
  the whole image resized to 224 x 224 (bilinear, no crop), mean = std = 0.5 (ViT-B/32,
  B/16, L/16, GAP);
- timm's data config of the MIIL model: resize the shorter side to 256, centre crop 224,
  mean 0, std 1;
- torchvision ``Resize((224, 224))``, mean = std = 0.5 for the CIFAR-100 model (32 x 32
  images upsampled);
- the Hugging Face ``DeiTImageProcessor`` of ``facebook/deit-base-distilled-patch16-224``
  for the Refinement model: 256 x 256 (bicubic), centre crop 224, ImageNet mean and std.

Example:
    >>> PAPER_MODELS["vit_b_16"].timm_name
    'vit_base_patch16_224.augreg_in21k_ft_in1k'
    >>> paper_model("vit_cifar_16").checkpoint, paper_model("vit_cifar_16").key_prefix
    ('vit_base_patch16_224-CIFAR100.pt', 'model.')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .preprocessing import Preprocessing, timm_preprocessing

INPUT_SIZE = (3, 224, 224)
"""Every paper model takes 224 x 224 RGB images."""


@dataclass(frozen=True)
class OfficialPreprocessing:
    """The preprocessing the official code used for a model, as timm eval-transform settings.

    Attributes:
        source: What the official code called (for the record).
        mean: Per-channel mean of the normalisation.
        std: Per-channel standard deviation.
        crop_pct: Crop fraction (1.0 with ``crop_mode="squash"``: no crop).
        crop_mode: timm crop mode (:data:`~class_space_saliency.preprocessing.CROP_MODES`).
        interpolation: Resize interpolation.
    """

    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str
    interpolation: str

    def build(self, class_names: Sequence[str] | None = None) -> Preprocessing:
        """The :class:`~class_space_saliency.preprocessing.Preprocessing` (224 x 224 input)."""
        return timm_preprocessing(
            INPUT_SIZE,
            self.mean,
            self.std,
            crop_pct=self.crop_pct,
            crop_mode=self.crop_mode,
            interpolation=self.interpolation,
            class_names=class_names,
        )


HALF = (0.5, 0.5, 0.5)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

HF_VIT_IN21K = OfficialPreprocessing(
    "transformers AutoImageProcessor of google/vit-{base,large}-patch{16,32}-224-in21k",
    HALF,
    HALF,
    crop_pct=1.0,
    crop_mode="squash",
    interpolation="bilinear",
)
TIMM_MIIL = OfficialPreprocessing(
    "timm.data.create_transform(**resolve_data_config({}, model=model)), timm 0.6.12",
    (0.0, 0.0, 0.0),
    (1.0, 1.0, 1.0),
    crop_pct=0.875,
    crop_mode="center",
    interpolation="bilinear",
)
TORCHVISION_CIFAR = OfficialPreprocessing(
    "torchvision Resize((224, 224)), CenterCrop(224), Normalize(0.5, 0.5)",
    HALF,
    HALF,
    crop_pct=1.0,
    crop_mode="squash",
    interpolation="bilinear",
)
HF_DEIT = OfficialPreprocessing(
    "transformers AutoImageProcessor of facebook/deit-base-distilled-patch16-224",
    IMAGENET_MEAN,
    IMAGENET_STD,
    crop_pct=0.875,
    crop_mode="squash",
    interpolation="bicubic",
)


@dataclass(frozen=True)
class PaperModel:
    """One of the paper's models: where its weights come from and how to build it.

    Attributes:
        key: The official code's name (``load_model("paper:KEY")``).
        name: The name in the paper.
        architecture: timm architecture that builds it (``timm.create_model``).
        num_classes: Classes of its head.
        preprocessing: The official code's preprocessing.
        tag: timm pretrained tag of the weights; ``None`` for a checkpoint (below).
        checkpoint: File name of the checkpoint the official code loads, where the weights
            are not in timm.
        checkpoint_url: Where the official code downloads that checkpoint (``None``: the user
            supplies it).
        key_prefix: Prefix on every key of the checkpoint, stripped on loading.
        ignored_keys: Prefixes of checkpoint keys that belong to parts the model does not
            use (dropped; any other mismatch is an error).
        note: Where to get the weights, and what sets the model apart.
    """

    key: str
    name: str
    architecture: str
    num_classes: int
    preprocessing: OfficialPreprocessing
    tag: str | None = None
    checkpoint: str | None = None
    checkpoint_url: str | None = None
    key_prefix: str | None = None
    ignored_keys: tuple[str, ...] = ()
    note: str = ""

    @property
    def timm_name(self) -> str | None:
        """``architecture.tag`` for weights from timm, else ``None``."""
        return f"{self.architecture}.{self.tag}" if self.tag else None


PAPER_MODELS: dict[str, PaperModel] = {
    model.key: model
    for model in (
        PaperModel(
            "vit_b_32",
            "ViT-B/32",
            "vit_base_patch32_224",
            1000,
            HF_VIT_IN21K,
            tag="augreg_in21k_ft_in1k",
            note="AugReg, ImageNet-21k pretrained, ImageNet-1k fine-tuned",
        ),
        PaperModel(
            "vit_b_16",
            "ViT-B/16",
            "vit_base_patch16_224",
            1000,
            HF_VIT_IN21K,
            tag="augreg_in21k_ft_in1k",
            note="AugReg; timm 1.0's bare name loads augreg2_in21k_ft_in1k instead",
        ),
        PaperModel(
            "vit_large_16",
            "ViT-L/16",
            "vit_large_patch16_224",
            1000,
            HF_VIT_IN21K,
            tag="augreg_in21k_ft_in1k",
            note="AugReg, ImageNet-21k pretrained, ImageNet-1k fine-tuned",
        ),
        PaperModel(
            "vit_miil_16",
            "ViT-B/16-MIIL",
            "vit_base_patch16_224_miil",
            1000,
            TIMM_MIIL,
            tag="in21k_ft_in1k",
            note="ImageNet-21k-P (MIIL); timm 1.0's bare name loads the 11,221-class in21k head",
        ),
        PaperModel(
            "vit_gap_16",
            "ViT-B/16-GAP",
            "vit_base_patch16_rpn_224",
            1000,
            HF_VIT_IN21K,
            tag="sw_in1k",
            note="no [CLS] token: global average pooling, residual post-norm blocks",
        ),
        PaperModel(
            "vit_cifar_16",
            "ViT-B/16 (CIFAR-100)",
            "vit_base_patch16_224",
            100,
            TORCHVISION_CIFAR,
            checkpoint="vit_base_patch16_224-CIFAR100.pt",
            key_prefix="model.",
            note="the authors' checkpoint folder (linked in the official README, step 2.3); "
            "its keys carry a 'model.' prefix",
        ),
        PaperModel(
            "deit_ensemble_16",
            "Refinement",
            "vit_base_patch16_224",
            1000,
            HF_DEIT,
            checkpoint="deit_base_trm.pth",
            checkpoint_url="https://github.com/Muzammal-Naseer/Improving-Adversarial-"
            "Transferability-of-Vision-Transformers/releases/download/v0/deit_base_trm.pth",
            ignored_keys=("transformerheads.",),
            note="DeiT-B with refinement heads on intermediate blocks (Naseer et al., ICLR "
            "2022); the analysis, like the official forward, reads the final [CLS] head only",
        ),
    )
}
"""The paper's models by the official code's names."""

_BY_TIMM_ARCHITECTURE = {m.architecture: m for m in PAPER_MODELS.values() if m.tag is not None}


def paper_model(key: str) -> PaperModel:
    """The paper model ``key`` (``"vit_b_32"``, ...).

    Raises:
        ValueError: For an unknown key (the message lists the keys and names).
    """
    if key not in PAPER_MODELS:
        known = ", ".join(f"{m.key} ({m.name})" for m in PAPER_MODELS.values())
        raise ValueError(f"unknown paper model {key!r}; the paper's models are: {known}")
    return PAPER_MODELS[key]


def paper_model_of_architecture(name: str) -> PaperModel | None:
    """The paper model whose timm weights use architecture ``name`` (a tag is ignored).

    The CIFAR-100 and Refinement models share ViT-B/16's architecture but not its weights:
    load them as ``"paper:KEY"``.
    """
    return _BY_TIMM_ARCHITECTURE.get(name.partition(".")[0])


def paper_weights_warning(name: str) -> str | None:
    """A warning for a bare timm name that timm resolves to other weights than the paper's.

    Works offline: timm's registry of pretrained configs is local.

    Args:
        name: A timm model name, with or without a ``.tag``.

    Returns:
        The warning text, or ``None`` when the name carries a tag, is not a paper
        architecture, or its default weights are the paper's.

    Example:
        >>> print(paper_weights_warning("vit_base_patch16_224"))  # doctest: +ELLIPSIS
        timm resolves 'vit_base_patch16_224' to vit_base_patch16_224.augreg2_in21k_ft_in1k, ...
        >>> paper_weights_warning("vit_base_patch32_224") is None  # the default is the paper's
        True
    """
    from timm.models import get_pretrained_cfg, split_model_name_tag

    architecture, tag = split_model_name_tag(name)
    paper = _BY_TIMM_ARCHITECTURE.get(architecture)
    if tag or paper is None:
        return None
    default = get_pretrained_cfg(architecture)
    resolved = getattr(default, "tag", None)
    if resolved == paper.tag:
        return None
    return (
        f"timm resolves {name!r} to {architecture}.{resolved}, not the weights of the paper's "
        f"{paper.name} ({paper.timm_name}); load 'paper:{paper.key}' or '{paper.timm_name}' "
        "to get the paper's model"
    )


@dataclass(frozen=True)
class PaperResult:
    """A number (or list of classes) the paper reports, with where it comes from.

    Attributes:
        model: The model's key in :data:`PAPER_MODELS`.
        analysis: The step that measures it: an analysis name of
            :data:`~class_space_saliency.analysis.ANALYSES` (``"identifiability"``, ...),
            ``"vilas2023"`` (the token-removal benchmark) or ``"value_vector_classes"``.
        quantity: What is measured, unique per model and analysis (``"image_token_rate"``).
        description: The quantity in words, with its unit.
        value: The reported value (a tuple of class names for value-vector classes).
        source: Where it is reported: the official repository's notebook, cell and function.
        note: What sets the official computation apart, where something does.
    """

    model: str
    analysis: str
    quantity: str
    description: str
    value: float | tuple[str, ...]
    source: str
    note: str = ""


_IDENTIFIABILITY = "notebooks/1_class_identifiability.ipynb"
_MECHANISMS = "notebooks/2_mechanistic_interpretability.ipynb"
_RATE = "image tokens whose top-1 class is the label, % per image averaged, last block"
_WITH_ONE = "images with at least one such image token (%), last block"


_NOTES = {
    ("vit_gap_16", "identifiability"): "the official code drops token 0 as [CLS]; this model "
    "has none, so it counts 195 of the 196 image tokens",
    ("vit_cifar_16", "identifiability"): "CIFAR-100 test images, the first 5 per class",
    ("vit_cifar_16", "vilas2023"): "CIFAR-100 test images, the first 5 per class",
}


def _results(
    model: str, analysis: str, source: str, rows: Sequence[tuple[str, str, float]], note: str = ""
) -> list[PaperResult]:
    """``PaperResult`` s of one model, analysis and source from ``(quantity, text, value)``."""
    note = note or _NOTES.get((model, analysis), "")
    return [PaperResult(model, analysis, *row[:2], row[2], source, note) for row in rows]


def _identifiability_results() -> list[PaperResult]:
    source = f"{_IDENTIFIABILITY}, print_identifiability and compute_accuracy (cells 12-24)"
    reported = {  # token rate %, images with one %, accuracy %
        "vit_b_32": (60.726173400878906, 95.5824203491211, 81.71),
        "vit_b_16": (67.04048156738281, 97.45054626464844, 85.69),
        "vit_large_16": (72.57792663574219, 97.12088012695312, 86.00),
        "vit_miil_16": (78.5220947265625, 95.51648712158203, 86.26),
        "vit_cifar_16": (90.35204315185547, 98.79999542236328, 92.00),
        "deit_ensemble_16": (79.6415023803711, 96.26373291015625, 84.97),
        "vit_gap_16": (52.08904266357422, 98.52747344970703, 84.13),
    }
    untrained = {  # print_identifiability('vit_b_32_random'), ('vit_b_16_random')
        "vit_b_32": (0.06638258695602417, 1.2747251987457275),
        "vit_b_16": (0.05617851763963699, 2.1758241653442383),
    }
    results = []
    for key, (rate, with_one, accuracy) in reported.items():
        rows = [("image_token_rate", _RATE, rate), ("images_with_one", _WITH_ONE, with_one)]
        if key in untrained:
            rate, with_one = untrained[key]
            rows += [
                ("image_token_rate_untrained", f"{_RATE}, random weights", rate),
                ("images_with_one_untrained", f"{_WITH_ONE}, random weights", with_one),
            ]
        results += _results(key, "identifiability", source, rows)
        accuracy_row = ("accuracy", "top-1 accuracy on the stimuli (%)", accuracy)
        results += _results(key, "vilas2023", source, [accuracy_row])
    return results


def _mechanism_results() -> list[PaperResult]:
    rate = "image-token identifiability rate (%), last block"
    knockout = [
        ("image_token_rate_unperturbed", f"{rate}, unperturbed", 60.726173400878906),
        (
            "image_token_rate_self_only",
            f"{rate}, image tokens attend only to themselves",
            0.1257142871618271,
        ),
        ("image_token_rate_no_cls", f"{rate}, image tokens ignore [CLS]", 60.71340560913086),
    ]
    removal = [
        (
            "object_token_rate_without_context",
            "object tokens identifiable with the context tokens removed (%), last block",
            44.70477294921875,
        ),
        (
            "object_token_rate_unperturbed",
            "the same object tokens in the unperturbed model (%), last block",
            71.91523742675781,
        ),
        (
            "context_token_rate_without_object",
            "context tokens identifiable with the object tokens removed (%), last block",
            38.683494567871094,
        ),
        (
            "context_token_rate_unperturbed",
            "the same context tokens in the unperturbed model (%), last block",
            56.24493408203125,
        ),
    ]
    differences = (0.007023, 0.029557, 0.127190, 0.215745, 0.231144, 0.232179)
    differences += (0.343491, 0.435765, -0.409439, -0.563637, -6.543204)
    p_values = (0.216667, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0)
    context = []
    for block, (difference, p_value) in enumerate(zip(differences, p_values, strict=True)):
        text = f"block {block}: attention's mean label-logit change, object minus context"
        context += [
            (f"attention_change_difference/{block}", text, difference),
            (f"attention_change_p_value/{block}", f"block {block}: its p-value", p_value),
        ]
    return [
        *_results(
            "vit_b_32",
            "attention_knockout",
            f"{_IDENTIFIABILITY}, print_attn_perturb('vit_b_32', ...) (cells 42, 46)",
            knockout,
        ),
        *_results(
            "vit_b_32",
            "context_removal",
            f"{_IDENTIFIABILITY}, print_context_perturb('vit_b_32', ...) (cells 67, 69)",
            removal,
        ),
        *_results(
            "vit_b_32",
            "context_identifiability",
            f"{_MECHANISMS}, compute_context_diff('vit_b_32', 'attn'), 300 permutations "
            "(cell 29, its table)",
            context,
        ),
    ]


_VALUE_VECTOR_CLASSES = {
    "vit_b_32": {  # cell 37
        4: ("racket, racquet", "tennis ball", "ping-pong ball", "volleyball", "croquet ball"),
        8: (
            "Arctic fox, white fox, Alopex lagopus",
            "brown bear, bruin, Ursus arctos",
            "wombat",
            "American black bear, black bear, Ursus americanus, Euarctos americanus",
            "wild boar, boar, Sus scrofa",
        ),
        10: (
            "agama",
            "whiptail, whiptail lizard",
            "alligator lizard",
            "green lizard, Lacerta viridis",
            "American chameleon, anole, Anolis carolinensis",
        ),
        32: (
            "groenendael",
            "Scotch terrier, Scottish terrier, Scottie",
            "Afghan hound, Afghan",
            "flat-coated retriever",
            "Newfoundland, Newfoundland dog",
        ),
        33: ("strawberry", "pineapple, ananas", "tray", "banana"),
        35: (
            "rifle",
            "revolver, six-gun, six-shooter",
            "assault rifle, assault gun",
            "scabbard",
            "holster",
        ),
        40: (
            "wolf spider, hunting spider",
            "garden spider, Aranea diademata",
            "barn spider, Araneus cavaticus",
            "harvestman, daddy longlegs, Phalangium opilio",
            "spider web, spider's web",
        ),
    },
    "vit_b_16": {  # cell 39
        2: (
            "boathouse",
            "paddle, boat paddle",
            "water buffalo, water ox, Asiatic buffalo, Bubalus bubalis",
            "gondola",
        ),
        7: (
            "microphone, mike",
            "radio, wireless",
            "electric guitar",
            "loudspeaker, speaker, speaker unit, loudspeaker system, speaker system",
        ),
        14: (
            "screwdriver",
            "carpenter's kit, tool kit",
            "plane, carpenter's plane, woodworking plane",
            "power drill",
            "shovel",
        ),
        18: ("collie", "Border collie", "kelpie", "kuvasz", "Eskimo dog, husky"),
        21: ("guinea pig, Cavia cobaya", "beaver", "hare", "hamster", "catamaran"),
        24: (
            "rifle",
            "assault rifle, assault gun",
            "revolver, six-gun, six-shooter",
            "bow",
            "holster",
        ),
        26: (
            "drum, membranophone, tympan",
            "maraca",
            "chime, bell, gong",
            "steel drum",
            "drumstick",
        ),
    },
}
"""Top-5 classes of MLP memories of block 10 that the official notebook prints: the columns
of ``model.head.weight @ model.blocks[10].mlp.fc2.weight`` ranked by dot product, with the
classes outside the ImageNet-S stimuli left out of the printout (hence four for some)."""

VALUE_VECTOR_BLOCK = 10
"""The block whose MLP memories the official notebook inspects."""


def _memory_results() -> list[PaperResult]:
    cells = {"vit_b_32": 37, "vit_b_16": 39}
    return [
        PaperResult(
            key,
            "value_vector_classes",
            f"{VALUE_VECTOR_BLOCK}/{memory}",
            f"block {VALUE_VECTOR_BLOCK} MLP memory {memory}: classes of the largest dot "
            "product of class embedding and value vector (stimulus classes only)",
            classes,
            f"{_MECHANISMS}, cell {cells[key]} (head.weight @ blocks[10].mlp.fc2.weight)",
        )
        for key, memories in _VALUE_VECTOR_CLASSES.items()
        for memory, classes in memories.items()
    ]


def _explainability_results() -> list[PaperResult]:
    figure = "notebooks/3_explainability.ipynb, plot_perturbation('vit_b_32', ...) (cells 25, 27)"
    probes = "notebooks/4_linear_probing.ipynb, plot_perturbation (cell 10)"
    reported = {  # (order, method): (AUC, source)
        ("negative", "class_space_gradient_paper"): (0.8362941079403841, figure),
        ("negative", "chefer"): (0.8454036573533792, figure),
        ("negative", "random"): (0.7158862672691159, figure),
        ("negative", "linear_probe"): (0.7385176825569436, probes),
        ("positive", "class_space_gradient_paper"): (0.41281954233979434, figure),
        ("positive", "chefer"): (0.39287127006033656, figure),
        ("positive", "random"): (0.7158862672691159, figure),
        ("positive", "linear_probe"): (0.6832468154198523, probes),
    }
    wording = {"negative": "least important first", "positive": "most important first"}
    notes = {
        "class_space_gradient_paper": "the paper's map: gradients of the class-space loss "
        "with respect to the attention, summed over heads and blocks (official double softmax)",
        "random": "the mean over 10 random token orders shared by all images (official "
        "compute_random), equal for both tests",
        "linear_probe": "accumulated ranks of ridge probes fitted on ImageNet-S test images, "
        "10 per class (official linear_probing/prober.py)",
    }
    return [
        PaperResult(
            "vit_b_32",
            "vilas2023",
            f"auc/{order}/{method}",
            f"token-removal AUC, {order} test ({wording[order]} removed), map: {method}",
            value,
            source,
            notes.get(method, ""),
        )
        for (order, method), (value, source) in reported.items()
    ]


PAPER_RESULTS: tuple[PaperResult, ...] = (
    *_identifiability_results(),
    *_mechanism_results(),
    *_memory_results(),
    *_explainability_results(),
)
"""Every number the paper reports that ``reproduce`` measures, from the outputs of the
official notebooks (martinagvilas/vit-cls_emb), in the order of the notebooks."""


def paper_results(model: str | None = None, analysis: str | None = None) -> list[PaperResult]:
    """The entries of :data:`PAPER_RESULTS` for a model and/or an analysis.

    Example:
        >>> [r.quantity for r in paper_results("vit_b_32", "attention_knockout")]
        ['image_token_rate_unperturbed', 'image_token_rate_self_only', 'image_token_rate_no_cls']
        >>> paper_results("vit_gap_16", "identifiability")[0].value
        52.08904266357422
    """
    if model is not None:
        paper_model(model)
    return [
        result
        for result in PAPER_RESULTS
        if model in (None, result.model) and analysis in (None, result.analysis)
    ]
