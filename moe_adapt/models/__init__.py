from .moe_vit import *  # noqa: F401,F403
