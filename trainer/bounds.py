"""The bounds of the config's numeric fields, in one place.

They are wide enough for a real multi-node GPU cluster (ViT-g on
1024 GPUs, ImageNet-22k, K = 262144, a global batch of 65536, 1000 epochs, 1024 px
crops, 64 local crops, 4096 workers of 256 CPUs each), narrow enough that a typo or a
hostile value (1e9 clusters, 1e6 px crops, 1e30 samples) is a validation error, not a
job that allocates without end. docs/training.md ("Bounds") says why each is where it is.
"""

from __future__ import annotations

MAX_EPOCHS = 100_000
"""Epochs and every epoch count (warm-ups, intervals): 100x ImageNet's longest recipes."""
MAX_STEPS = 1_000_000
"""Step intervals (log_every_steps)."""
MAX_SAMPLES = 10**12
"""Training images (data.max_samples): far above LAION-5B."""
MAX_SYNTHETIC_SAMPLES = 10_000_000
"""Images of the in-memory synthetic set."""
MAX_IMAGE_SIZE = 2048
"""Side of crops (data.*_crop_size) and of a patch, in pixels."""
MAX_SYNTHETIC_IMAGE_SIZE = 1024
"""Side of the in-memory synthetic images."""
MAX_LOCAL_CROPS = 128
"""Local (student) views per image."""
MAX_BATCH_SIZE = 65_536
"""Images per worker per step (a global batch of 65536 fits on a single worker)."""
MAX_LOADER_WORKERS = 256
"""DataLoader processes per training worker (one per core of a 256-core node)."""
MAX_CLUSTERS = 1_048_576
"""K, the number of prototypes: 4x the largest K in the literature (262144)."""
MAX_HEAD_DIM = 131_072
"""Width of the head's hidden and bottleneck layers."""
MAX_HEAD_LAYERS = 32
"""Linear layers of the head MLP."""
MAX_TEMPERATURE = 100.0
"""Softmax temperatures (student, teacher, k-NN): useful values lie in (0, 1]."""
MAX_LEARNING_RATE = 100.0
"""Learning rates per 256 images (LARS recipes use < 5)."""
MAX_WEIGHT_DECAY = 10.0
"""Weight decay (recipes use <= 0.5)."""
MAX_CLIP_GRAD = 1e6
"""Gradient-norm clipping threshold."""
MAX_SINKHORN_ITERS = 1000
"""Sinkhorn-Knopp iterations (SwAV and DINOv2 use 3)."""
MAX_KNN_K = 100_000
"""k of a k-NN vote."""
MAX_KNN_KS = 16
"""How many k the k-NN evaluation votes with."""
MAX_SEED = 2**32 - 1
"""Seeds: NumPy's legacy generator takes at most 32 bits."""
MAX_WORKERS = 8192
"""Data-parallel training workers (Ray): twice 4096 GPUs."""
MAX_CPUS_PER_WORKER = 1024.0
"""CPUs reserved per training worker."""
MAX_FAILURES = 100
"""Worker-failure retries of one run."""
MAX_KEEP_CHECKPOINTS = 1000
"""Checkpoints kept."""
MAX_NAME_LENGTH = 128
"""Run, backbone and metric names."""
MAX_PATH_LENGTH = 4096
"""Characters of a path (Linux's PATH_MAX)."""
MAX_PATH_COMPONENT_BYTES = 255
"""UTF-8 bytes of one component of a path (Linux's NAME_MAX)."""
MAX_PATTERN_LENGTH = 256
"""Characters of a ``data.pattern`` glob."""

MAX_CAPACITY_WAIT_S = 7 * 24 * 3600.0
"""Longest wait of a job for an autoscaling cluster to grow to its size (a week)."""
