from .flow_matching_pretrainer import FlowMatchingPretrainer  # noqa: F401
from .lora import LoRAAdapter  # noqa: F401
from .mogan_distiller import CheckpointInit, LatentVideoDiscriminator, MoGANDistiller  # noqa: F401
from .mogan_schedules import WarmupGatedPlan  # noqa: F401
from .motion_discriminator import MotionDiscriminator  # noqa: F401
from .optical_flow import LucasKanadeFlow, OpticalFlowEstimator, RAFTFlow  # noqa: F401
from .register_token_discriminator import RegisterTokenDiscriminator  # noqa: F401
from .step_plans import CyclicStepPlan, VDOTAlgorithm1  # noqa: F401
from .tiny_codecs import TinyTextEncoder, TinyWanVAE  # noqa: F401
from .vace_acc_wan_init import VACEAccWanInit  # noqa: F401
from .vae_decoding import WindowedVAEDecoding  # noqa: F401
from .vdot_distiller import VDOTDistiller  # noqa: F401
from .wan_vace_score import WanVACEScore  # noqa: F401
