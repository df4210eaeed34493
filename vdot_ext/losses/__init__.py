from .denoising_loss import DenoisingLoss  # noqa: F401
from .dmd_loss import DMDLoss  # noqa: F401
from .gan_loss import RelativisticGANLoss  # noqa: F401
from .logistic_gan_loss import LogisticGANLoss  # noqa: F401
from .otd_loss import OTDLoss  # noqa: F401
