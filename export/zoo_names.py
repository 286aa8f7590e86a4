"""Names of the zoo's models, without importing torch (for CLI choices and --help)."""

MODEL_NAMES = ["mobilenet_v2", "resnet18", "resnet34", "shufflenet_v2_x1_0", "vgg11"]
