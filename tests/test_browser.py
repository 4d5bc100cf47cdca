"""A researcher's login, and an admin's GPU page, in a real browser (Debian's Chromium driven by Selenium),
against a real hub.

The screenshots (the profile form, the place in the GPU queue, the time-limit warning, the GPU page) are
saved to test-output/; docs/ holds the copies the README shows.
"""

from __future__ import annotations

import datetime
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

import simnvml
from helpers import ROOT, container_of, login, sim_config, unavailable
from testbed import DockerBed, free_port, wait_for
from testbed.hub import RunningHub

pytestmark = pytest.mark.docker
OUTPUT = ROOT / "test-output"


@pytest.fixture
def browser() -> Iterator[object]:
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        unavailable("selenium is not installed (pip install -e '.[test]')")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        unavailable("Chromium is not installed (Debian packages chromium and chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1100,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_a_researcher_picks_a_gpu_profile_and_lands_in_jupyterlab(
    start_hub: Callable[..., RunningHub], docker_bed: DockerBed, lab_image: str, tmp_path: Path, browser: object
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    spec = simnvml.write_spec(tmp_path / "gpus.json", [
        simnvml.gpu(0),
        simnvml.gpu(1, processes=[{"pid": 4242, "used_memory": 8 * 2**30}]),
        simnvml.gpu(2, mig=[simnvml.mig_device(2, 0), simnvml.mig_device(2, 1)]),
    ])
    profiles = [
        {"slug": "cpu", "display_name": "CPU only", "description": "Pandas, plotting, writing.", "image": lab_image},
        {"slug": "a100-1", "display_name": "1 × A100 · PyTorch", "description": "A whole A100 for training.",
         "image": lab_image, "gpus": {"count": 1, "model": "A100"}, "cpu_limit": 2, "mem_limit": "4G",
         "allowed_groups": ["ml-lab"], "default": True},
        {"slug": "mig", "display_name": "MIG 1g.10gb slice", "description": "A tenth of an A100 for notebooks.",
         "image": lab_image, "gpus": {"mig_profile": "1g.10gb"}},
        {"slug": "h100-2", "display_name": "2 × H100", "description": "For the big runs.",
         "image": lab_image, "gpus": {"count": 2, "model": "H100"}},
        {"slug": "course", "display_name": "Course", "image": lab_image, "gpus": {"mig_profile": "1g.10gb"},
         "allowed_groups": ["students"]},
    ]
    hub = start_hub(extra=sim_config(spec, f"""
c.JupyterHub.load_groups = {{"ml-lab": {{"users": ["ada"]}}}}
c.GPUSpawner.profiles = {profiles!r}
c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}
c.Spawner.default_url = "/lab"
"""))

    driver.get(f"{hub.url}/hub/login")
    driver.find_element(By.ID, "username_input").send_keys("ada")
    driver.find_element(By.ID, "password_input").send_keys("any")
    driver.find_element(By.ID, "login_submit").click()
    deadline = time.monotonic() + 30
    while "/hub/spawn" not in driver.current_url and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "/hub/spawn" in driver.current_url, driver.current_url

    radios = driver.find_elements(By.CSS_SELECTOR, "input[name=profile]")
    assert [r.get_attribute("value") for r in radios] == ["cpu", "a100-1", "mig", "h100-2"]  # not "course"
    badges = {b.get_attribute("data-availability"): b.text for b in driver.find_elements(By.CSS_SELECTOR, "[data-availability]")}
    assert badges == {
        "cpu": "no GPU needed",
        "a100-1": "1 of 2 NVIDIA A100-SXM4-80GB free",
        "mig": "2 of 2 MIG 1g.10gb free",
        "h100-2": "no matching GPU on this host",
    }
    enabled = {r.get_attribute("value"): r.is_enabled() for r in radios}
    assert enabled == {"cpu": True, "a100-1": True, "mig": True, "h100-2": False}
    assert driver.find_element(By.ID, "profile-a100-1").is_selected()  # the default profile
    # each choice is labelled, so it is reachable by keyboard and announced by screen readers
    for r in radios:
        label = driver.find_element(By.CSS_SELECTOR, f"label[for={r.get_attribute('id')}]")
        assert label.text
    OUTPUT.mkdir(exist_ok=True)
    driver.save_screenshot(str(OUTPUT / "spawn-form.png"))

    driver.find_element(By.CSS_SELECTOR, "label[for=profile-a100-1]").click()
    driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()

    log = ""
    deadline = time.monotonic() + 120
    while "/user/ada/lab" not in driver.current_url and time.monotonic() < deadline:
        try:
            log = driver.find_element(By.ID, "progress-log").get_attribute("textContent") or log
        except Exception:
            pass  # the page is changing under us
        time.sleep(0.2)
    assert "/user/ada/lab" in driver.current_url, (driver.current_url, log, hub.log_tail())
    assert "Profile: 1 × A100 · PyTorch" in log
    assert "Allocated NVIDIA A100-SXM4-80GB" in log
    assert "Starting container" in log
    while "JupyterLab" not in driver.title and time.monotonic() < deadline:
        time.sleep(0.5)
    assert "JupyterLab" in driver.title
    driver.save_screenshot(str(OUTPUT / "jupyterlab.png"))

    record = docker_bed.hook_record(container_of(docker_bed, hub, "ada")["Id"])
    assert record["devices"] == [simnvml.gpu(0)["uuid"]]


def browser_login(driver: object, hub: RunningHub, user: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{hub.url}/hub/logout")  # type: ignore[attr-defined]
    driver.get(f"{hub.url}/hub/login")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "username_input").send_keys(user)  # type: ignore[attr-defined]
    driver.find_element(By.ID, "password_input").send_keys("any")  # type: ignore[attr-defined]
    driver.find_element(By.ID, "login_submit").click()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while "/hub/login" in driver.current_url and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(0.2)


def test_the_progress_page_shows_the_place_in_line_and_the_home_page_warns_before_a_time_limit(
    start_hub: Callable[..., RunningHub], tmp_path: Path, browser: object
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])  # one GPU, at 0 %
    hub = start_hub(extra=sim_config(spec, """
from gpuspawner.reclaim import HUB_TEMPLATES, page_notices
c.JupyterHub.template_paths = [HUB_TEMPLATES]
c.JupyterHub.template_vars = {"gpuspawner_notices": page_notices}
c.GPUSpawner.gpu_request = 1
c.GPUSpawner.gpu_wait_timeout = 300
c.Spawner.start_timeout = 300
c.GPUSpawner.gpu_sample_seconds = 1
c.GPUSpawner.gpu_idle_timeout = "2h"
c.GPUSpawner.limit_warning_seconds = 3 * 3600  # so the warning shows at once
c.JupyterHub.tornado_settings = {"slow_spawn_timeout": 0}
"""))
    assert hub.spawn("ada").status_code in (201, 202)
    hub.wait_ready("ada")
    assert hub.spawn("bob").status_code == 202  # ada holds the only GPU: bob waits in line

    browser_login(driver, hub, "bob")
    driver.get(f"{hub.url}/hub/spawn-pending/bob")
    log, deadline = "", time.monotonic() + 60
    while "1st in line" not in log and time.monotonic() < deadline:
        log = driver.find_element(By.ID, "progress-log").get_attribute("textContent") or ""
        time.sleep(0.3)
    assert "Waiting for 1 × any GPU: 1st in line" in log, log
    OUTPUT.mkdir(exist_ok=True)
    driver.save_screenshot(str(OUTPUT / "queue-position.png"))

    browser_login(driver, hub, "ada")
    notice, deadline = "", time.monotonic() + 60
    while not notice and time.monotonic() < deadline:
        driver.get(f"{hub.url}/hub/home")
        found = driver.find_elements(By.CSS_SELECTOR, "[data-gpuspawner-notice=warning]")
        notice = found[0].text if found else ""
        time.sleep(0.5)
    assert notice.startswith("Your server: This server stops in 2 h: its GPU has been idle (under 5 %)"), notice
    driver.save_screenshot(str(OUTPUT / "home-warning.png"))


def seed_month(tmp_path: Path, *, now: datetime.datetime) -> None:
    """Earlier servers of this month in the hub's audit store, sealed with its key, as a hub that has run a while
    leaves them (the test hub then opens the same store, key and chain head)."""
    from gpuspawner.audit import AuditRecord, RecordedDevice
    from gpuspawner.store import AuditStore, load_key

    store = AuditStore(f"sqlite:///{tmp_path / 'gpuspawner-audit.sqlite'}",
                       key=load_key(tmp_path / "gpuspawner-audit.key", create=True),
                       head_file=tmp_path / "gpuspawner-audit.head")
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    span = (now - month) * 0.9  # the same shares of the month so far, whatever today is
    a100 = [RecordedDevice(uuid=simnvml.gpu(n)["uuid"], model="NVIDIA A100-SXM4-80GB", memory_total=80 << 30) for n in (0, 1)]
    for n, (user, share, devices) in enumerate([("lin", 1.0, a100), ("ravi", 0.45, a100[:1]), ("sam", 0.2, a100[1:])]):
        start = (month + span * (1 - share)).isoformat()
        record = AuditRecord(id=f"seed-{n}", hub_id="test-earlier", user=user, server="", requested_at=start,
                             started_at=start, devices=tuple(devices), profile="a100-1", outcome="running")
        store.insert(record)
        store.finish(record.id, outcome="stopped", stopped_at=(month + span).isoformat())
    store.dispose()


def test_an_admin_sees_every_gpu_its_holder_and_the_months_usage_and_a_user_gets_403(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path, browser: object
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    gpus = [
        simnvml.gpu(0),
        simnvml.gpu(1, memory_used=8 * 2**30, utilization=97, processes=[{"pid": 4242, "used_memory": 8 * 2**30}]),
        simnvml.gpu(2, mig=[simnvml.mig_device(2, 0), simnvml.mig_device(2, 1)]),
    ]
    spec = simnvml.write_spec(tmp_path / "gpus.json", gpus)
    seed_month(tmp_path, now=datetime.datetime.now(datetime.timezone.utc))
    profiles = [
        {"slug": "a100-1", "display_name": "1 × A100", "image": singleuser_image, "gpus": {"count": 1, "model": "A100"},
         "default": True},
        {"slug": "mig", "display_name": "MIG 1g.10gb slice", "image": singleuser_image, "gpus": {"mig_profile": "1g.10gb"}},
    ]
    port = free_port()
    hub = start_hub(extra=sim_config(spec, f"""
from gpuspawner.gpupage import gpu_page_service
gpu_page_service(c, config_file=__file__, port={port}, sample_seconds=1, history_seconds=60)
c.Authenticator.admin_users = {{"boss"}}
# who reads the audit may see the GPUs: the readers' scope, and the hub's leave to open the service
c.JupyterHub.load_roles.append({{"name": "gpu-readers", "users": ["aud"],
                                 "scopes": ["custom:gpuspawner-audit:read", "access:services!service=gpus"]}})
c.JupyterHub.redirect_to_server = False
c.GPUSpawner.profiles = {profiles!r}
c.GPUSpawner.gpu_sample_seconds = 1
c.GPUSpawner.max_runtime = "8h"
c.GPUSpawner.gpu_idle_timeout = "1h"
"""))
    assert hub.spawn("ada", options={"profile": "a100-1"}).status_code in (201, 202)
    assert hub.spawn("cyd", options={"profile": "mig"}).status_code in (201, 202)
    hub.wait_ready("ada")
    hub.wait_ready("cyd")

    stop = threading.Event()

    def ada_trains() -> None:  # ada's GPU busy in waves, as a training run with evaluation pauses is
        tick = 0
        while not stop.wait(1.0):
            tick += 1
            gpus[0]["utilization"] = [12, 35, 78, 92, 95, 88, 60, 20, 8, 5, 30, 70][tick % 12]
            gpus[0]["memory_used"] = 21 * 2**30
            simnvml.write_spec(spec, gpus)

    trainer = threading.Thread(target=ada_trains, daemon=True)
    trainer.start()
    try:
        url = f"{hub.url}/services/gpus/"
        wait_for(lambda: requests.get(url, timeout=5, allow_redirects=False).status_code in (302, 403), timeout=60,
                 what="the GPU page to answer")
        assert login(hub, "aud").get(url, timeout=60).status_code == 200  # an audit reader, not an admin

        browser_login(driver, hub, "bob")
        driver.get(url)
        assert "403" in driver.find_element(By.TAG_NAME, "body").text
        assert not driver.find_elements(By.ID, "gpus")

        browser_login(driver, hub, "boss")
        gpu0 = simnvml.gpu(0)["uuid"]

        def row(uuid: str) -> dict[str, str] | None:
            driver.get(url)
            cells = driver.find_elements(By.CSS_SELECTOR, f'tr[data-uuid="{uuid}"] td')
            return {"holder": cells[4].text, "state": cells[3].text, "uuid": cells[2].text} if cells else None

        found = wait_for(lambda: (r := row(gpu0)) and r["holder"] == "ada" and r, timeout=60, interval=1,
                         what="the GPU page to show ada holding GPU 0")
        assert found == {"holder": "ada", "state": "held", "uuid": gpu0}
        time.sleep(40)  # samples for the chart: ada's GPU in waves
        driver.set_window_size(1440, 900)
        driver.get(url)
        states = {r.get_attribute("data-uuid"): r.find_element(By.CSS_SELECTOR, ".state").text
                  for r in driver.find_elements(By.CSS_SELECTOR, "#gpus tbody tr")}
        mig = [simnvml.mig_device(2, s)["uuid"] for s in (0, 1)]
        assert states == {gpu0: "held", simnvml.gpu(1)["uuid"]: "busy", simnvml.gpu(2)["uuid"]: "MIG",
                          mig[0]: "held", mig[1]: "free"}
        holders = {r.get_attribute("data-uuid"): r.find_element(By.CSS_SELECTOR, ".holder").text
                   for r in driver.find_elements(By.CSS_SELECTOR, "#gpus tbody tr")}
        assert holders[mig[0]] == "cyd"
        chart = driver.find_element(By.CSS_SELECTOR, f'tr[data-uuid="{gpu0}"] td.chart svg')
        assert chart.get_attribute("role") == "img" and len(chart.find_elements(By.CSS_SELECTOR, "polyline")) >= 1
        assert (chart.get_attribute("aria-label") or "").startswith(f"NVIDIA A100-SXM4-80GB {gpu0} utilisation over the last 1 min: now ")
        bars = {label.get_attribute("textContent"): label for label in driver.find_elements(By.CSS_SELECTOR, "#usage svg text.label")}
        assert {"lin", "ravi", "sam", "ada", "cyd"} <= bars.keys(), bars.keys()
        widths = {r.find_element(By.CSS_SELECTOR, "text.label").get_attribute("textContent"):
                  float(r.find_element(By.CSS_SELECTOR, "rect.bar").get_attribute("width") or 0)
                  for r in driver.find_elements(By.CSS_SELECTOR, "#usage svg g.row")}
        assert widths["ada"] >= 1 and widths["lin"] == pytest.approx(widths["ravi"] / 0.45 * 2, rel=0.02)
        OUTPUT.mkdir(exist_ok=True)
        driver.save_screenshot(str(OUTPUT / "gpus-page.png"))
    finally:
        stop.set()
        trainer.join(timeout=5)


def test_a_user_downloads_the_ro_crate_of_their_own_server_and_gets_403_for_anothers(
    start_hub: Callable[..., RunningHub], singleuser_image: str, tmp_path: Path, browser: object
) -> None:
    from selenium.webdriver.common.by import By

    from gpuspawner.store import AuditStore

    driver = browser
    spec = simnvml.write_spec(tmp_path / "gpus.json", [simnvml.gpu(0)])
    profiles = [{"slug": "gpu", "display_name": "One GPU", "image": singleuser_image, "gpus": 1, "default": True}]
    port = free_port()
    hub = start_hub(extra=sim_config(spec, f"""
from gpuspawner.service import audit_service, users_read_own_records
audit_service(c, config_file=__file__, port={port})
users_read_own_records(c)
c.JupyterHub.redirect_to_server = False
c.GPUSpawner.profiles = {profiles!r}
"""))
    assert hub.spawn("ada").status_code in (201, 202)
    assert hub.spawn("bob").status_code == 503  # ada holds the only GPU: bob's refused spawn has its record too
    hub.wait_ready("ada")
    store = AuditStore(f"sqlite:///{hub.settings.workdir / 'gpuspawner-audit.sqlite'}")
    (ada_record,) = [r for r in store.iter_records() if r.user == "ada"]
    (bob_record,) = [r for r in store.iter_records() if r.user == "bob"]
    store.dispose()
    url = f"{hub.url}/services/audit/"
    wait_for(lambda: requests.get(url, timeout=5, allow_redirects=False).status_code in (302, 403), timeout=60,
             what="the audit service to answer")

    browser_login(driver, hub, "ada")
    driver.get(url)
    rows = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "tbody tr"), timeout=30, what="ada's records")
    assert [r.find_elements(By.TAG_NAME, "td")[1].text for r in rows] == ["ada"]  # her own servers only
    assert driver.find_element(By.TAG_NAME, "h1").text == "Your servers and their environments"
    OUTPUT.mkdir(exist_ok=True)
    driver.set_window_size(1920, 420)  # type: ignore[attr-defined]
    driver.save_screenshot(str(OUTPUT / "own-records.png"))
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})  # type: ignore[attr-defined]
    rows[0].find_element(By.CSS_SELECTOR, "a.ro-crate").click()
    crate = downloads / "ro-crate-metadata.json"
    wait_for(lambda: crate.exists() and crate.stat().st_size > 0, timeout=30, what="the RO-Crate to download")
    graph = json.loads(crate.read_text())["@graph"]
    (action,) = [e for e in graph if e["@type"] == "CreateAction"]
    assert action["@id"] == f"#server-{ada_record.id}" and "docker run" in action["description"]
    assert {e["value"] for e in graph if e.get("propertyID") == "devices.uuid"} == {simnvml.gpu(0)["uuid"]}

    for name in ("ro-crate-metadata.json", "record.json", "reproduce.sh"):  # bob's record: refused, not empty
        driver.get(f"{url}records/{bob_record.id}/{name}")
        body = driver.find_element(By.TAG_NAME, "body").text
        assert body.startswith("403") and bob_record.id not in body, body
    ada = login(hub, "ada")  # the same, without a browser: an export asking for bob's records is refused
    assert ada.get(url + "export.csv?user=bob", timeout=60).status_code == 403
    assert [line.split(",")[0].strip('"') for line in ada.get(url + "export.csv", timeout=60).text.splitlines()[1:]] == [ada_record.id]
