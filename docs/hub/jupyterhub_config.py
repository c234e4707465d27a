"""JupyterHub for a LoRA Lab class: the one recipe (docs/instructors.md, "JupyterHub").

Run it as root, from the shared copy of the lab (root starts each student's JupyterLab as that
student, which needs root):

    /opt/lora-lab/.venv/bin/python -m jupyterhub -f /opt/lora-lab/docs/hub/jupyterhub_config.py

tests/browser/test_hub.py starts the hub from this very file. What must differ between a class
and the test comes from these environment variables; unset, each has the class default shown:

    LORA_LAB_COPY            /opt/lora-lab        the lab's read-only copy (a git clone)
    LORA_LAB_VENV            $LORA_LAB_COPY/.venv  the venv everyone runs (of /usr/bin/python3)
    LORA_LAB_HUB_STATE       /srv/lora-lab-hub    the hub's database, cookie secret and pid files
    LORA_LAB_HUB_IP          (all addresses)      where students connect ...
    LORA_LAB_HUB_PORT        8000                 ... http://HOST:8000 (put HTTPS in front)
    LORA_LAB_HUB_API_PORT    8081                 the hub's own API, on 127.0.0.1
    LORA_LAB_PROXY_API_PORT  8001                 the proxy's API, on 127.0.0.1
    LORA_LAB_DASHBOARD_PORT  8866                 the dashboard service, on 127.0.0.1
    LORA_LAB_STUDENTS        lora-students        the group whose members may log in
    LORA_LAB_DASHBOARD_USER  lora-dashboard       the system user the dashboard runs as
    LORA_LAB_DASHBOARD_CULL  120                  seconds a dashboard kernel nobody uses lives

Everything else is the same for every class.
"""

import os
import pwd
from pathlib import Path

c = get_config()  # noqa: F821  (JupyterHub's config loader provides get_config)


def setting(name: str, default: str) -> str:
    """An environment variable from the list above, or its class default when unset or empty."""
    return os.environ.get(name) or default


def port(name: str, default: int) -> int:
    value = setting(name, str(default))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{name}={value!r}: give a TCP port, a whole number from 1 to 65535")
    return int(value)


COPY = Path(setting("LORA_LAB_COPY", "/opt/lora-lab"))
PYTHON = str(Path(setting("LORA_LAB_VENV", str(COPY / ".venv"))) / "bin" / "python")
STATE = Path(setting("LORA_LAB_HUB_STATE", "/srv/lora-lab-hub"))
STUDENTS = setting("LORA_LAB_STUDENTS", "lora-students")
DASHBOARD_USER = setting("LORA_LAB_DASHBOARD_USER", "lora-dashboard")
DASHBOARD_PORT = port("LORA_LAB_DASHBOARD_PORT", 8866)

# -- the hub, its proxy and their state -------------------------------------------------------
# Students open the proxy's address; the hub's API and the proxy's API stay on 127.0.0.1. The
# database (users, their servers' addresses, API tokens), the cookie secret (signs every login
# cookie) and the pid files live in STATE, which only root may read: made 0700 here.
STATE.mkdir(mode=0o700, parents=True, exist_ok=True)
STATE.chmod(0o700)
c.JupyterHub.bind_url = f"http://{setting('LORA_LAB_HUB_IP', '')}:{port('LORA_LAB_HUB_PORT', 8000)}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = port("LORA_LAB_HUB_API_PORT", 8081)
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{port('LORA_LAB_PROXY_API_PORT', 8001)}"
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(STATE / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(STATE / "proxy.pid")
c.JupyterHub.cleanup_servers = True  # stopping the hub stops every student's server

# -- who may log in ---------------------------------------------------------------------------
# The machine's own accounts and passwords (PAM). JupyterHub 5 and later let nobody in without
# an allow list; a group is the one a class keeps up to date with the accounts themselves
# (`useradd -G lora-students`, `gpasswd -d NAME lora-students` when someone leaves), whereas a
# list of names here would need a hub restart for every change. Accounts outside the group, root
# and the dashboard's user among them, are refused at the login page.
c.JupyterHub.authenticator_class = "pam"
c.PAMAuthenticator.allowed_groups = {STUDENTS}

# -- each student's JupyterLab: a process of their own OS user --------------------------------
c.JupyterHub.spawner_class = "localprocess"
# The venv's jupyterhub-singleuser, run as a module of the venv's Python: the same program, and
# it still runs if the venv's folder is ever moved (a console script names its own path).
c.Spawner.cmd = [PYTHON, "-m", "jupyterhub.singleuser"]
c.Spawner.args = [
    f"--LabApp.app_settings_dir={COPY / 'notebooks' / '.jupyter' / 'lab' / 'settings'}",
    "--LabServerApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
]
c.Spawner.default_url = "/lab"
c.Spawner.ip = "127.0.0.1"  # students reach their server only through the proxy
# Starting a JupyterLab takes longer than JupyterHub's 30 s default when a room logs in at once.
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
# Jupyter configuration from a student's home is ignored (~/.jupyter and the like), so the
# settings below cannot be undone by a student's own file.
c.Spawner.disable_user_config = True
c.Spawner.environment = {
    # Kernels import `lab` from the read-only copy (the same copy the venv installs editable).
    "PYTHONPATH": str(COPY),
    # The venv's commands first, for a student's terminal (`nbgrader fetch_assignment`, ...).
    "PATH": f"{Path(PYTHON).parent}:/usr/local/bin:/usr/bin:/bin",
    # nbgrader's instructor pieces off for students, the Assignment List kept (in the File
    # menu): docs/hub/student-jupyter, whose labconfig/page_config.json disables and locks the
    # JupyterLab plugins (the Nbgrader menu, the formgrader, Create Assignment, the course
    # list), labconfig/default_setting_overrides.json puts Assignment List in the File menu,
    # and jupyter_server_config.json turns the formgrader and course-list server extensions off.
    "JUPYTER_CONFIG_PATH": str(COPY / "docs" / "hub" / "student-jupyter"),
    # torch makes its compiler cache folder when any optimizer is built (/tmp/torchinductor_<user>
    # by default); notebooks 02 and 03 build one by hand, so it goes under each student's own
    # lab cache folder (docs/instructors.md). JupyterHub calls a callable value per spawner.
    "TORCHINDUCTOR_CACHE_DIR": lambda spawner: os.path.join(
        pwd.getpwnam(spawner.user.name).pw_dir, ".cache", "lora-lab", "torchinductor"
    ),
}

# -- services: the dashboard for the room, and the idle-server culler -------------------------
# Voilà serves the dashboard at /services/dashboard/ as its own unprivileged user (its sweep
# cache is that user's ~/.cache/lora-lab/sweeps). Every visit starts a kernel, and so does the
# hub when it checks a service's address: once at start, then every service_check_interval.
# Nothing connects to a checked kernel, so each stays until Voilà culls it: checking every
# minute kept 6 such kernels (2.2 GB) alive with a 5-minute cull, and 2 or 3 with a 2-minute
# one. So the hub checks only at start (a managed service that exits is restarted whether or
# not it is checked), and Voilà culls a kernel nobody is connected to after 2 idle minutes:
# none is left 155 s after start. A kernel whose page is open is never culled
# (MappingKernelManager.cull_connected stays False).
c.JupyterHub.service_check_interval = 0
CULL = setting("LORA_LAB_DASHBOARD_CULL", "120")
if not CULL.isdigit() or not 10 <= int(CULL) <= 86400:
    raise ValueError(f"LORA_LAB_DASHBOARD_CULL={CULL!r}: give whole seconds from 10 to 86400")
CULL_EVERY = min(30, int(CULL) // 4)  # how often Voilà looks for idle kernels
dashboard = {
    "name": "dashboard",
    "url": f"http://127.0.0.1:{DASHBOARD_PORT}",
    "user": DASHBOARD_USER,
    "cwd": str(COPY / "notebooks"),
    "environment": {"PYTHONPATH": str(COPY)},
    "command": [
        PYTHON, "-m", "voila", str(COPY / "notebooks" / "dashboard.ipynb"),
        "--no-browser",
        "--Voila.ip=127.0.0.1",
        f"--port={DASHBOARD_PORT}",
        "--Voila.port_retries=0",
        "--Voila.base_url=/services/dashboard/",  # the proxy forwards the whole path
        f"--MappingKernelManager.cull_idle_timeout={CULL}",
        f"--MappingKernelManager.cull_interval={CULL_EVERY}",
    ],
}  # fmt: skip
# A student's server idle for an hour is stopped (their files stay; logging in starts it
# again): jupyterhub-idle-culler, with only the rights it needs.
culler = {
    "name": "idle-culler",
    "command": [PYTHON, "-m", "jupyterhub_idle_culler", "--timeout=3600", "--cull-every=300"],
}
c.JupyterHub.services = [dashboard, culler]
c.JupyterHub.load_roles = [
    {
        "name": "idle-culler",
        "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"],
        "services": ["idle-culler"],
    }
]
