from . import vcu_dataset  # noqa: F401  (registers VCUManifestDataset in DATASETS)
