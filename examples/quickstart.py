"""Class-space saliency and class identifiability on a small timm ViT (runs offline).

Run:
    python examples/quickstart.py
"""

import timm
import torch

from class_space_saliency import ClassSpaceSaliency, class_identifiability

torch.manual_seed(0)
model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, depth=4).eval()
images = torch.randn(2, 3, 224, 224)  # normalised images
labels = torch.tensor([3, 7])

explainer = ClassSpaceSaliency(model, layer=-1, score="logit")
maps = explainer.attribute(images, target=labels)  # (2, 1, 14, 14), one forward pass
print("maps", tuple(maps.shape))
per_block = explainer.attribute(images, target=labels, layer="all", per_layer=True)
print("per-block maps", tuple(per_block.shape))
print(class_identifiability(model, images, labels))
