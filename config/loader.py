"""Load and validate config/app_config.json and config/models_config.json.

Every error names the file and the key path (``$.proxies.ollama.port``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import msgspec

from config import runtime
from config.schema import AppConfig, ModelConfig, ModelName, ModelsConfig

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent
APP_FILE = "app_config.json"
MODELS_FILE = "models_config.json"


class ConfigError(Exception):
    """A config file is missing, is not JSON, or breaks the schema."""


@dataclass
class Config:
    """Both files, decoded. Mutable only so that a reload can update a long-lived holder in place."""

    app: AppConfig
    models: ModelsConfig
    config_dir: Path

    def update_from(self, other: Config) -> None:
        self.app, self.models = other.app, other.models

    @property
    def models_root(self) -> Path:
        root = self.app.models_root
        return Path(root).expanduser() if root else runtime.default_models_root()

    def model_size(self, model: ModelConfig) -> int:
        """Bytes of a model on disk: its file, or all files of its directory (a whisper model); 0 if missing."""
        return model_size(self.model_path(model))

    def model_path(self, model: ModelConfig) -> Path:
        """Absolute path of a model file; relative paths are under the models root."""
        path = Path(model.model_path).expanduser()
        return path if path.is_absolute() else self.models_root / path

    def logs_dir(self) -> Path:
        path = Path(self.app.logs_dir).expanduser()
        return path if path.is_absolute() else Path.cwd() / path

    def resolve_model(self, name: str) -> str | None:
        """The configured name for ``name`` (a name, an alias, or ``name:latest``), else None."""
        if not name:
            return self.models.default_model
        candidates = [name]
        if name.casefold().endswith(":latest"):
            candidates.append(name[: -len(":latest")])
        for cand in candidates:
            if cand in self.models.models:
                return cand
            for key, model in self.models.models.items():
                if cand in model.aliases:
                    return key
        for cand in candidates:  # then regardless of case, as Ollama matches names ("SmolLM2")
            folded = cand.casefold()
            for key, model in self.models.models.items():
                if folded == key.casefold() or any(folded == a.casefold() for a in model.aliases):
                    return key
        return None


def _decode(path: Path, kind: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {_name_dict_keys(raw, str(exc))}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None


def _name_dict_keys(raw: bytes, message: str) -> str:
    """msgspec says ``$.models[...]`` for a dict value and ``key in $.models`` for a key: find which model entry
    (or name) is wrong and name it."""
    bad_key = "at `key` in `$.models`" in message
    if "$.models[...]" not in message and not bad_key:
        return message
    try:
        doc = msgspec.json.decode(raw)
        for name, entry in (doc.get("models") or {}).items():
            try:
                if bad_key:
                    msgspec.convert(name, ModelName)
                else:
                    msgspec.convert(entry, ModelConfig)
            except msgspec.ValidationError:
                if bad_key:
                    return (f"model name {name!r} is not valid: {message.split(' - at ')[0]} (1 to 128 letters, "
                            "digits and . _ : @ + -, starting with a letter or digit) - at $.models")
                return message.replace("$.models[...]", f"$.models.{name}")
    except Exception:
        pass
    return message


def load_config(config_dir: Path | str | None = None) -> Config:
    cdir = Path(config_dir).expanduser() if config_dir else DEFAULT_CONFIG_DIR
    app = _decode(cdir / APP_FILE, AppConfig)
    models = _decode(cdir / MODELS_FILE, ModelsConfig)
    assert isinstance(app, AppConfig) and isinstance(models, ModelsConfig)
    _check_models(cdir / MODELS_FILE, models, app)
    config = Config(app=app, models=models, config_dir=cdir)
    for i, name in enumerate(models.preload):  # (a name as requests name it: an alias too)
        if not name.strip() or config.resolve_model(name) is None:
            raise ConfigError(f"{cdir / MODELS_FILE}: preload `{name}` is not a configured model - at $.preload[{i}]")
    return config


ACCEPTED_DIR = "config"  # in the run dir: the config the supervisor runs on, as it accepted it


def write_accepted(config: Config, run_dir: Path | str) -> None:
    """Keep the config the supervisor runs on in ``run_dir`` (private to this user): the gateways read it there,
    not in the user's files, which may have changed since (a file broken and refused by a reload stopped a gateway
    from starting again after a crash)."""
    target = Path(run_dir) / ACCEPTED_DIR
    target.mkdir(mode=0o700, exist_ok=True)
    for name, doc in ((APP_FILE, config.app), (MODELS_FILE, config.models)):
        tmp = target / (name + ".tmp")
        tmp.write_bytes(msgspec.json.encode(doc))
        os.chmod(tmp, 0o600)  # (API keys)
        os.replace(tmp, target / name)


def load_accepted(run_dir: Path | str, config_dir: Path | str | None) -> Config:
    """The config the supervisor runs on (``write_accepted``), else the user's files (a run dir without it)."""
    accepted = Path(run_dir) / ACCEPTED_DIR
    if (accepted / MODELS_FILE).is_file() and (accepted / APP_FILE).is_file():
        config = load_config(accepted)
        config.config_dir = Path(config_dir).expanduser() if config_dir else DEFAULT_CONFIG_DIR
        return config
    return load_config(config_dir)


def _check_models(path: Path, models: ModelsConfig, app: AppConfig) -> None:
    seen: dict[str, tuple[str, str]] = {}  # a name as clients' names match it -> (model, the name as written)
    for name, model in models.models.items():
        for alias in [name, *model.aliases]:
            # (clients' names match regardless of case and of ":latest", as Ollama's: "smolC" and "SMOLC:latest"
            # would be one name, and one of the two models out of reach)
            key = alias.casefold().removesuffix(":latest")
            if key in seen and seen[key][0] != name:
                other, written = seen[key]
                same = f"`{alias}`" if written == alias else f"`{alias}` (as `{written}`: names are matched " \
                    "regardless of case and of `:latest`)"
                raise ConfigError(f"{path}: name {same} is used by both `{other}` and `{name}` - at $.models")
            seen[key] = (name, alias)
    if len(models.preload) > app.limits.max_loaded_models:
        raise ConfigError(f"{path}: preload lists {len(models.preload)} models, more than limits.max_loaded_models "
                          f"({app.limits.max_loaded_models}) can be loaded at once - at $.preload")
    if models.default_model is not None and models.default_model not in models.models:
        raise ConfigError(f"{path}: default_model `{models.default_model}` is not a configured model - at $.default_model")


def model_file_problem(path: str) -> str:
    """Why a llama model's file cannot be loaded as it is on disk (not there, not a file), or ""."""
    if os.path.isfile(path):
        return ""
    return f"model file {'is not a file' if os.path.exists(path) else 'not found'}: {path}"


def model_size(path: Path) -> int:
    """Bytes of a model on disk: a file's size, or the sum of the files in a directory (a whisper model: its
    directory's own size, 4096, was shown as the model's); 0 if it is not there."""
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return 0
