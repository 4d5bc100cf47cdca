"""Logins for a lab hub: NativeAuthenticator, each person with an account of their own.

``LabNativeAuthenticator`` is NativeAuthenticator (people sign up, an admin authorises them)
with its login page mended for JupyterHub 6, which dropped statsd and renders a failed form
through ``_render(sync=True, …)``; NativeAuthenticator 1.3 (the newest release) answers every
login with a 500 there. Drop the mending once a release supports JupyterHub 6.

Use it in ``jupyterhub_config.py`` (``pip install 'gpuspawner[hub]'``)::

    from gpuspawner.auth import LabNativeAuthenticator, TEMPLATE_DIR
    c.JupyterHub.authenticator_class = LabNativeAuthenticator
    c.JupyterHub.template_paths = [TEMPLATE_DIR]
"""

from __future__ import annotations

from typing import Any

try:
    from nativeauthenticator import NativeAuthenticator
    from nativeauthenticator.handlers import TEMPLATE_DIR
    from nativeauthenticator.handlers import LoginHandler as NativeLoginHandler
except ImportError:  # pragma: no cover - depends on the installation
    raise ImportError(
        "gpuspawner's lab logins need NativeAuthenticator: pip install 'gpuspawner[hub]' "
        "(or jupyterhub-nativeauthenticator)."
    ) from None
from tornado.escape import url_escape
from tornado.httputil import url_concat

__all__ = ["LabNativeAuthenticator", "TEMPLATE_DIR"]


class _NoStatsd:
    """What NativeAuthenticator's login handler asks of the statsd client JupyterHub 6 removed."""

    def timer(self, *args: object) -> _NoStatsd:
        return self

    def start(self) -> _NoStatsd:
        return self

    def stop(self, **kwargs: object) -> None:
        pass


class LoginHandler(NativeLoginHandler):  # type: ignore[misc]
    """NativeAuthenticator 1.3's login page, mended for JupyterHub 6."""

    statsd = _NoStatsd()

    def _render(self, login_error: str | None = None, username: str | None = None, sync: bool = False, **ignored: Any) -> Any:
        next_url = self.get_argument("next", default="")
        return self.render_template(
            "native-login.html", sync=sync, next=url_escape(next_url), username=username,
            login_error=login_error, custom_html=self.authenticator.custom_html,
            login_url=self.settings["login_url"], enable_signup=self.authenticator.enable_signup,
            two_factor_auth=self.authenticator.allow_2fa,
            authenticator_login_url=url_concat(self.authenticator.login_url(self.hub.base_url), {"next": next_url}),
        )


class LabNativeAuthenticator(NativeAuthenticator):  # type: ignore[misc]
    """NativeAuthenticator with the mended login page; configure it as ``c.NativeAuthenticator``."""

    def get_handlers(self, app: Any) -> list[tuple[str, Any]]:
        return [(path, LoginHandler if h is NativeLoginHandler else h) for path, h in super().get_handlers(app)]
