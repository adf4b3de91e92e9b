"""Footprint of a run: energy (kWh), CO2 (kg) and water (L), measured by codecarbon's offline tracker.

    with track_footprint("FRA", water_l_per_kwh=1.8) as fp:
        train()
    fp.result  # {"energy_kwh": ..., "co2_kg": ..., "water_l": ..., "method": ...}

codecarbon runs offline and quietly: no network, no API, no emissions.csv, errors only. It measures the CPU
with RAPL and NVIDIA GPUs with NVML where the machine exposes them, and otherwise estimates from CPU load x TDP
(containers and VMs usually hide RAPL). In "process" mode it counts this process (and its data-loader workers),
not the other jobs sharing the machine. It starts in the background, a moment after the run: its figures cover
`tracked_seconds` of the run's `seconds` and are scaled to the whole run. If codecarbon fails, or tracked less
than half the run, the footprint is estimated from this process's CPU time x the CPU's TDP. `basis` says which:
"measured" (hardware counters over the whole run), "scaled" (hardware counters over part of it, extrapolated)
or "estimated"; `method` says how, in words. Nothing is rounded up: a run that used no CPU time shows 0.

CO2 = energy x the carbon intensity of the country's grid (codecarbon's offline table, `country`: ISO 3166-1
alpha-3, default FRA, where the project runs). Water = energy x `water_l_per_kwh`: default 1.8 L/kWh, the
average on-site water usage effectiveness of US data centres (Shehabi et al. 2016, "United States Data Center
Energy Usage Report", LBNL); it leaves out the water used to generate the electricity, which depends on the grid
(roughly 0-4 L/kWh more): raise the factor (--water-factor) to include it.

Data: `bytes_downloaded` is what the hub caches grew by during the run (the Hugging Face hub cache HF_HUB_CACHE,
its datasets cache HF_DATASETS_CACHE, and TORCH_HOME's hub, where timm and torchvision weights land), measured
before and after; `bytes_read` the image files the run read (to hash them and to decode new content; a rerun whose
files are unchanged reads none). The transfer's energy is bytes_downloaded x TRANSFER_KWH_PER_GB = 0.06 kWh/GB, the
2015 estimate of Aslan, Mayers, Koomey and France (2018), "Electricity Intensity of Internet Data Transmission:
Untangling the Estimates", Journal of Industrial Ecology 22(4) (it has halved about every two years since, so it is
an upper bound today); its CO2 uses the same grid factor as the run's. Reading local files costs no transfer energy
(the CPU's share is in the run's own figure). `total_energy_kwh` and `total_co2_kg` add both; `method` names every
factor.
"""
from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from typing import Any

from .errors import AffinageError

DEFAULT_COUNTRY = "FRA"
WATER_L_PER_KWH = 1.8  # US data-centre average on-site WUE (Shehabi et al. 2016); see the module docstring
FALLBACK_TDP_W = 85.0  # codecarbon's own default when a CPU model is not in its TDP table
WORLD_CARBON_G_PER_KWH = 475.0  # IEA world average, used only when the country table is unavailable
MIN_TRACKED_SHARE = 0.5  # codecarbon must have tracked this share of the run for its figures to be scaled up
WHOLE_RUN = 0.99  # tracked share from which codecarbon's figures count as covering the whole run (not scaled)
TRANSFER_KWH_PER_GB = 0.06  # Aslan et al. 2018 (2015 figure); see the module docstring
MEASURED_CPU_MODES = {"intel_rapl": "RAPL", "intel_power_gadget": "Intel Power Gadget", "windows_emi": "Windows EMI",
                      "powermetrics": "powermetrics", "apple_powermetrics": "powermetrics"}


def _country_table() -> dict[str, Any] | None:
    """codecarbon's offline per-country energy mix, read from its data file: importing `codecarbon.input` for it
    (pandas and all) cost 0.4 s of every run."""
    import json
    from importlib import util

    try:
        spec = util.find_spec("codecarbon")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "private_infra", "global_energy_mix.json")
        with open(path, encoding="utf-8") as fh:
            table = json.load(fh)
        return table if isinstance(table, dict) else None
    except (OSError, ValueError):  # codecarbon's data unreadable: the fallback estimate still works
        return None


def check_country(code: str) -> str:
    """Normalise an ISO 3166-1 alpha-3 code; raise naming some valid ones if codecarbon does not know it."""
    normal = str(code).strip().upper()
    table = _country_table()
    if table is not None and normal not in table:
        examples = ", ".join(sorted(table)[:12])
        raise AffinageError(f"unknown country code '{code}' for the carbon intensity",
                            f"pass an ISO 3166-1 alpha-3 code with --country, e.g. FRA, DEU, USA, GBR ({examples}, ...)")
    if table is None and (len(normal) != 3 or not normal.isalpha()):
        raise AffinageError(f"'{code}' is not an ISO 3166-1 alpha-3 country code", "pass e.g. --country FRA")
    return normal


def carbon_intensity(country: str) -> float:
    """gCO2e per kWh of the country's grid (codecarbon's offline table), else the world average."""
    table = _country_table() or {}
    value = table.get(country, {}).get("carbon_intensity")
    return float(value) if value else WORLD_CARBON_G_PER_KWH


class FootprintTracker:
    """Start/stop around a run; `stop()` returns (and keeps in `result`) the footprint dict."""

    def __init__(self, country: str = DEFAULT_COUNTRY, water_l_per_kwh: float = WATER_L_PER_KWH):
        if not water_l_per_kwh >= 0:
            raise AffinageError(f"water factor must be >= 0 L/kWh, got {water_l_per_kwh}", "pass e.g. --water-factor 1.8")
        self.country = check_country(country)
        self.water_l_per_kwh = float(water_l_per_kwh)
        self.result: dict[str, Any] | None = None
        self._tracker: Any = None
        self._error: str | None = None
        self._t0 = 0.0
        self._cpu0 = 0.0
        self._caches0: dict[str, int] = {}

    def start(self) -> "FootprintTracker":
        """Starts codecarbon in a background thread: its hardware probe takes about a second, which then overlaps
        with loading the model instead of adding to every run."""
        import threading

        self._t0, self._cpu0 = time.perf_counter(), _cpu_seconds()
        self._caches0 = hub_cache_bytes()
        self._starter = threading.Thread(target=self._start_codecarbon, name="affinage-footprint", daemon=True)
        self._starter.start()
        return self

    def _start_codecarbon(self) -> None:
        try:
            tracker = _codecarbon_tracker(self.country)
            with _quiet():
                tracker.start()
            self._tracker, self._tracked_from = tracker, time.perf_counter()
        except Exception as exc:  # any codecarbon failure: fall back to the estimate, never fail the run
            self._tracker, self._error = None, _one_line(exc)

    def stop(self, bytes_read: int | None = None) -> dict[str, Any]:
        """The footprint (computed once); `bytes_read`: the image bytes the run read (data.DecodedImages)."""
        if self.result is not None:
            return self.result
        starter = getattr(self, "_starter", None)
        if starter is not None:
            starter.join(timeout=60)
        seconds = time.perf_counter() - self._t0
        result = None
        if self._tracker is not None:
            try:
                with _quiet():
                    self._tracker.stop()
                result = self._from_codecarbon(self._tracker, seconds)
            except Exception as exc:
                self._error = _one_line(exc)
        if result is None:
            result = self._estimate(seconds)
        self.result = self._with_transfer(result, bytes_read)
        return self.result

    def _with_transfer(self, result: dict[str, Any], bytes_read: int | None) -> dict[str, Any]:
        after = hub_cache_bytes()
        grown = {k: max(0, after.get(k, 0) - self._caches0.get(k, 0)) for k in after}
        downloaded = sum(grown.values())
        intensity = result["carbon_intensity_g_per_kwh"]
        kwh = downloaded / 1e9 * TRANSFER_KWH_PER_GB
        co2 = kwh * intensity / 1000.0
        method = (f"{result['method']}; transfer: {downloaded:,} bytes downloaded (growth of the hub caches "
                  f"{', '.join(sorted(after)) or 'none found'}) x {TRANSFER_KWH_PER_GB} kWh/GB (Aslan et al. 2018) "
                  f"x {intensity:.0f} gCO2e/kWh ({self.country} grid); water {self.water_l_per_kwh:g} L/kWh of the "
                  "run's energy (Shehabi et al. 2016)")
        return {**result, "method": method, "bytes_downloaded": downloaded, "downloaded_by_cache": grown,
                "bytes_read": bytes_read, "transfer_kwh_per_gb": TRANSFER_KWH_PER_GB, "transfer_kwh": kwh,
                "transfer_co2_kg": co2, "total_energy_kwh": result["energy_kwh"] + kwh,
                "total_co2_kg": result["co2_kg"] + co2}

    def _from_codecarbon(self, tracker: Any, seconds: float) -> dict[str, Any] | None:
        data = tracker.final_emissions_data
        energy, co2 = float(data.energy_consumed or 0.0), float(data.emissions or 0.0)
        tracked = seconds - (getattr(self, "_tracked_from", self._t0) - self._t0)
        if tracked < MIN_TRACKED_SHARE * seconds:
            self._error = f"codecarbon tracked only {max(tracked, 0.0):.1f} s of the {seconds:.1f} s run"
            return None
        if not (energy > 0 and co2 > 0):
            self._error = f"codecarbon reported {energy} kWh / {co2} kg"
            return None
        scaled = tracked < WHOLE_RUN * seconds
        scale = seconds / tracked if scaled else 1.0  # codecarbon started a moment after the run (in the background)
        measured, estimated = _hardware_sources(tracker)
        parts = "; ".join(p for p in (", ".join(measured) + " measured" if measured else "",
                                      ", ".join(estimated) + " estimated" if estimated else "") if p)
        how = f"over {tracked:.1f} s of the {seconds:.1f} s run, scaled to the whole run" if scaled else "over the whole run"
        method = f"{'measured' if measured else 'estimated'} by codecarbon {how} ({parts})"
        basis = "estimated" if not measured else "scaled" if scaled else "measured"
        return self._result(energy * scale, co2 * scale, seconds, method, basis, tracked_seconds=tracked,
                            cpu_kwh=float(data.cpu_energy or 0.0) * scale, gpu_kwh=float(data.gpu_energy or 0.0) * scale,
                            ram_kwh=float(data.ram_energy or 0.0) * scale, tracking_mode=data.tracking_mode,
                            tracker=f"codecarbon {data.codecarbon_version}")

    def _estimate(self, seconds: float) -> dict[str, Any]:
        """This process's CPU time (all its threads and workers) x the CPU's TDP per core: no floor, no clamp."""
        cores = os.cpu_count() or 1
        cpu_seconds = max(0.0, _cpu_seconds() - self._cpu0)
        energy = FALLBACK_TDP_W * cpu_seconds / cores / 3.6e6
        intensity = carbon_intensity(self.country)
        why = f" (codecarbon unavailable: {self._error})" if self._error else ""
        method = (f"estimated from CPU time x TDP: {FALLBACK_TDP_W:g} W x {cpu_seconds:.1f} CPU-seconds / {cores} "
                  f"cores{why}")
        return self._result(energy, energy * intensity / 1000.0, seconds, method, "estimated", tracker="affinage",
                            cpu_seconds=cpu_seconds)

    def _result(self, energy: float, co2: float, seconds: float, method: str, basis: str,
                **extra: Any) -> dict[str, Any]:
        intensity = co2 * 1000.0 / energy if energy > 0 else carbon_intensity(self.country)
        return {"energy_kwh": energy, "co2_kg": co2, "water_l": energy * self.water_l_per_kwh, "method": method,
                "basis": basis, "measured": basis == "measured", **extra, "seconds": seconds, "country": self.country,
                "carbon_intensity_g_per_kwh": intensity, "water_l_per_kwh": self.water_l_per_kwh}


def _hardware_sources(tracker: Any) -> tuple[list[str], list[str]]:
    """(measured, estimated): how codecarbon got each device's power, in words."""
    measured, estimated = [], []
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode = getattr(hw, "_mode", "")
            if mode in MEASURED_CPU_MODES:
                measured.append(f"CPU via {MEASURED_CPU_MODES[mode]}")
            else:
                tdp = getattr(hw, "_tdp", None)
                estimated.append(f"CPU {'load x TDP' if mode == 'cpu_load' else 'constant TDP'}"
                                 + (f" ({tdp:g} W)" if isinstance(tdp, (int, float)) else ""))
        elif kind == "GPU":
            measured.append("GPU via NVML")
        elif kind == "RAM":
            estimated.append("RAM from its size")
        else:
            estimated.append(kind)
    return measured, estimated


@contextlib.contextmanager
def track_footprint(country: str = DEFAULT_COUNTRY, water_l_per_kwh: float = WATER_L_PER_KWH) -> Iterator[FootprintTracker]:
    """Measure the block; `fp.result` is set on exit (or earlier by `fp.stop()`), also when the block raises."""
    tracker = FootprintTracker(country, water_l_per_kwh).start()
    try:
        yield tracker
    finally:
        tracker.stop()


def _codecarbon_tracker(country: str) -> Any:
    with _quiet():
        from codecarbon import OfflineEmissionsTracker
    with _quiet():  # again: importing codecarbon sets its logger back to INFO
        return OfflineEmissionsTracker(country_iso_code=country, log_level="error", output_methods=[],
                                       tracking_mode="process", allow_multiple_runs=True, project_name="affinage")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """codecarbon logs at INFO/WARNING before it applies log_level, and warns on deprecated arguments."""
    logging.getLogger("codecarbon").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def hub_cache_folders() -> dict[str, str]:
    """The caches where a run's downloads land: {name: folder} (those that exist)."""
    home = os.path.expanduser("~")
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache"),
                                                          "huggingface")
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                              os.path.join(home, ".cache"), "torch")
    folders = {"HF_HUB_CACHE": os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
               or os.path.join(hf_home, "hub"),
               "HF_DATASETS_CACHE": os.environ.get("HF_DATASETS_CACHE") or os.path.join(hf_home, "datasets"),
               "TORCH_HOME": os.path.join(torch_home, "hub")}
    return {k: v for k, v in folders.items() if os.path.isdir(v)}


def hub_cache_bytes() -> dict[str, int]:
    """Bytes of the regular files under each hub cache (symbolic links, e.g. the HF snapshots, not followed)."""
    sizes = {}
    for name, folder in hub_cache_folders().items():
        total = 0
        for root, _, files in os.walk(folder):
            for f in files:
                try:
                    st = os.lstat(os.path.join(root, f))
                except OSError:
                    continue
                total += st.st_size if not os.path.islink(os.path.join(root, f)) else 0
        sizes[name] = total
    return sizes


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__
