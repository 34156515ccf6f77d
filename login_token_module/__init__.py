"""login_token_module: sign in a new Matrix device from an existing session.

Enable it in a homeserver's YAML ``modules:`` list as
``login_token_module.LoginTokenModule``.
"""

from login_token_module.config import ConfigError, LoginTokenConfig
from login_token_module.module import LoginTokenModule

__all__ = ["ConfigError", "LoginTokenConfig", "LoginTokenModule"]
__version__ = "0.1.0"
