"""The systemd unit in a site kit: portable and least-privilege.

Portable: the unit names the kit's place on the hospital's machine in ONE setting,
``Environment=FEDBUS_KIT_DIR=...`` (written from the project's ``federation.install_dir``,
default ``/opt/fedbus``, plus the site id); nothing in it is a path of the provisioning
machine, and ``fedbus`` is found on the service's PATH, not at the provisioner's venv.
Everything else in the kit is relative to the kit (``site.toml`` resolves its paths against
its own directory).

Least privilege: the worker runs as the dedicated unprivileged user ``fedbus`` (never root),
writes only its state directory (``StateDirectory=``, 0700, handed to the worker as
``FEDBUS_STATE_DIR``), sees the rest of the file system read-only (``ProtectSystem=strict``)
and can never gain privileges (``NoNewPrivileges=``).
"""

from __future__ import annotations

DEFAULT_INSTALL_DIR = "/opt/fedbus"
SERVICE_USER = "fedbus"


def state_directory(site_id: str) -> str:
    """The unit's StateDirectory= name (under /var/lib)."""
    return f"fedbus-{site_id}"


def site_unit(*, site_id: str, federation: str, install_dir: str | None) -> str:
    """The unit text for one site kit."""
    home = f"{(install_dir or DEFAULT_INSTALL_DIR).rstrip('/')}/{site_id}"
    state = state_directory(site_id)
    return f"""# systemd unit for the fedbus site worker {site_id} (written by fedbus provision).
# Install (as root), once the kit is at FEDBUS_KIT_DIR below (the one setting: edit it if the kit lives elsewhere):
#   useradd --system --no-create-home --shell /usr/sbin/nologin {SERVICE_USER}
#   chown -R {SERVICE_USER}:{SERVICE_USER} {home}      # the data file must be readable by {SERVICE_USER} too
#   cp fedbus-site.service /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now fedbus-site
# fedbus must be on the service's PATH (/usr/local/bin or /usr/bin), e.g. pipx install --global fedbus.
# The worker keeps its privacy ledger, split key and approvals in /var/lib/{state}; run operator
# commands that read them with the same: sudo -u {SERVICE_USER} FEDBUS_STATE_DIR=/var/lib/{state} fedbus site ...
[Unit]
Description=fedbus site worker {site_id} (federation {federation})
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
Environment=FEDBUS_KIT_DIR={home}
Environment=FEDBUS_STATE_DIR=%S/{state}
Environment=PYTHONUNBUFFERED=1
ExecStart=/usr/bin/env fedbus site run --config ${{FEDBUS_KIT_DIR}}/site.toml
User={SERVICE_USER}
Group={SERVICE_USER}
StateDirectory={state}
StateDirectoryMode=0700
KillSignal=SIGTERM
TimeoutStopSec=60
Restart=on-failure
RestartSec=5s
# Exit 2: bad configuration or broker credentials refused; restarting will not fix it.
RestartPreventExitStatus=2
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
CapabilityBoundingSet=
AmbientCapabilities=
UMask=0077

[Install]
WantedBy=multi-user.target
"""
