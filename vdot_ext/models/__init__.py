from .wan_vace_score import WanVACEScore  # noqa: F401
from .flow_matching_pretrainer import FlowMatchingPretrainer  # noqa: F401
from .vdot_distiller import VDOTDistiller  # noqa: F401
from .register_token_discriminator import RegisterTokenDiscriminator  # noqa: F401
from .vace_acc_wan_init import VACEAccWanInit  # noqa: F401
from .lora import LoRAAdapter  # noqa: F401
from .tiny_codecs import TinyTextEncoder, TinyWanVAE  # noqa: F401
