"""JupyterHub configuration for a LoRA Lab class, as the browser tests run it.

`jupyterhub -f tests/browser/hub_config.py` with $LORA_LAB_HUB_SETTINGS naming a JSON file that
tests/browser/servers.py (start_hub) writes: the ports, the run folder, the class password, the
students and the services. Everything else is here, as an instructor would write it:

- the hub, its proxy (configurable-http-proxy, from npm) and the proxy's API on 127.0.0.1, with the
  database, cookie secret and pid files in the run folder;
- students log in with their name and the class password (SharedPasswordAuthenticator, which
  replaces a password on the dummy authenticator since JupyterHub 5.3); nobody else can;
- each student's JupyterLab is a local process of the hub's own OS user (SimpleLocalProcessSpawner)
  with a home of their own, and every per-user folder (Jupyter, IPython, matplotlib, the XDG
  folders and the lab's sweep cache) inside that home;
- the dashboard (Voilà) as hub-managed services under /services/<name>/.
"""

import json
import os
from pathlib import Path

c = get_config()  # noqa: F821  (JupyterHub's config loader provides get_config)
settings = json.loads(Path(os.environ["LORA_LAB_HUB_SETTINGS"]).read_text())
run = Path(settings["run_dir"])

# -- the hub and its proxy: their own ports, state files in the run folder --------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{settings['proxy_port']}"  # what students open
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = settings["hub_port"]
c.JupyterHub.db_url = f"sqlite:///{run / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(run / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(run / "jupyterhub.pid")
c.ConfigurableHTTPProxy.command = settings["proxy_command"]
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{settings['proxy_api_port']}"
c.ConfigurableHTTPProxy.auth_token = settings["proxy_token"]
c.ConfigurableHTTPProxy.pid_file = str(run / "proxy.pid")
c.JupyterHub.cleanup_servers = True  # stopping the hub stops every student's server

# -- who may log in ---------------------------------------------------------------------------
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = settings["password"]
c.Authenticator.allowed_users = set(settings["users"])

# -- each student's JupyterLab ----------------------------------------------------------------
c.JupyterHub.spawner_class = "simple"
c.SimpleLocalProcessSpawner.home_dir_template = str(run / "homes" / "{username}")
c.Spawner.cmd = settings["singleuser"]  # this environment's jupyterhub-singleuser
c.Spawner.args = settings["args"]  # --allow-root when the hub runs as root, the lab's defaults
c.Spawner.default_url = "/lab"
c.Spawner.ip = "127.0.0.1"
# Two students spawning at once on a 2-core machine take longer than the 30 s default.
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180


def in_home(relative: str):
    """An environment value the spawner computes per student: a folder inside their home."""
    return lambda spawner: str(Path(spawner.home_dir) / relative)


c.Spawner.environment = {
    **settings["student_env"],
    **{var: in_home(rel) for var, rel in settings["student_folders"].items()},
}

# -- the dashboard as hub-managed services (/services/<name>/ on the hub's address) -----------
c.JupyterHub.services = settings["services"]
