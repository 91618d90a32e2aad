"""``save`` / ``load`` of a remote pyvene model's interventions: data only.

pyvene 0.1.8 saves with ``torch.save`` (pickles) and loads by importing the class named in
its config (``get_type_from_string``). Here a saved model is two files:

- ``hookwire_pyvene.json``: the representations (plain JSON fields), the mode, the keys, and per
  intervention its type *name*, the constructor sizes (``embed_dim``, ``low_rank_dimension``,
  ``latent_dim``) and flags;
- ``interventions.safetensors``: every intervention's ``state_dict`` (rotations, masks,
  temperatures, autoencoder weights, constant sources, noise), raw tensors.

Loading maps a type name to a class through :data:`hookwire.pyvene.ALLOWED` only (never an
import), builds each intervention with the saved sizes, and loads its tensors with
``load_state_dict(strict=True)``; anything else in the files raises :class:`SavedModelError`.
pyvene's own folders (``config.json`` + ``intkey_*.bin`` pickles) are refused with a message
saying how to bring their weights over.
"""
from __future__ import annotations

import json
import os

import pyvene as pv
import torch
from pyvene.models.configuration_intervenable_model import RepresentationConfig
from safetensors.torch import load_file, save_file

from hookwire.errors import HookwireError
from hookwire.pyvene.allowed import ALLOWED

CONFIG_FILE = "hookwire_pyvene.json"
WEIGHTS_FILE = "interventions.safetensors"
FORMAT = "hookwire-pyvene"
VERSION = 1
_TYPES = {cls.__name__: cls for cls in ALLOWED}
# Representation fields saved as they are (JSON scalars / nested lists).
_FIELDS = ("layer", "component", "unit", "max_number_of_units", "low_rank_dimension",
           "subspace_partition", "group_key", "intervention_link_key", "moe_key", "latent_dim")


class SavedModelError(HookwireError):
    """A folder that is not a readable hookwire save of a remote pyvene model."""
    code = "saved_model_error"


def _sizes(iv) -> dict:
    """The constructor arguments that decide an intervention's tensor shapes."""
    embed = getattr(iv, "embed_dim", None)
    sizes = {"embed_dim": int(embed) if embed is not None else None}
    if isinstance(iv, pv.LowRankRotatedSpaceIntervention):
        sizes["low_rank_dimension"] = int(iv.rotate_layer.weight.shape[1])
    elif isinstance(iv, pv.JumpReLUAutoencoderIntervention):
        sizes["low_rank_dimension"] = int(iv.W_enc.shape[1])
    elif isinstance(iv, pv.AutoencoderIntervention):
        sizes["latent_dim"] = int(iv.autoencoder.latent_dim)
    return sizes


def _jsonable(value, what: str):
    try:
        json.dumps(value)
    except TypeError:
        raise SavedModelError(f"{what} = {value!r} cannot be saved as JSON") from None
    return value


def _interchange_dim(iv):
    """interchange_dim when it is not a buffer (then the state dict carries it)."""
    if "interchange_dim" in dict(iv.named_buffers()) or iv.interchange_dim is None:
        return None
    value = iv.interchange_dim
    return value.tolist() if isinstance(value, torch.Tensor) else value


def save_interventions(remote, save_directory: str) -> None:
    pvm = remote._pv
    os.makedirs(save_directory, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    owner: dict[int, str] = {}          # linked keys share one object: saved once
    interventions = {}
    for key in pvm.sorted_keys:
        iv = pvm.interventions[key]
        first = owner.setdefault(id(iv), key)
        if first == key:
            for name, t in iv.state_dict().items():
                tensors[f"{key}/{name}"] = t.detach().to("cpu").contiguous().clone()
        interventions[key] = {
            "type": type(iv).__name__, "weights": first, **_sizes(iv),
            "is_source_constant": bool(iv.is_source_constant),
            "subspace_partition": _jsonable(iv.subspace_partition, f"{key} subspace_partition"),
            "interchange_dim": _interchange_dim(iv),
        }
    representations = []
    for key in pvm.sorted_keys:
        rep = pvm.representations[key]
        representations.append({f: _jsonable(getattr(rep, f), f"{key} {f}") for f in _FIELDS})
    config = {"format": FORMAT, "version": VERSION, "model": remote.model_name,
              "mode": pvm.mode, "keys": list(pvm.sorted_keys),
              "representations": representations, "interventions": interventions}
    save_file(tensors, os.path.join(save_directory, WEIGHTS_FILE))
    with open(os.path.join(save_directory, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=1)


def _read(load_directory: str) -> tuple[dict, dict]:
    config_path = os.path.join(load_directory, CONFIG_FILE)
    if not os.path.isfile(config_path):
        if os.path.isfile(os.path.join(load_directory, "config.json")):
            raise SavedModelError(
                f"{load_directory!r} was saved by pyvene (config.json and intkey_*.bin pickles), "
                "which hookwire does not unpickle. Load it locally with "
                "pv.IntervenableModel.load(dir, model=<a local copy of the model>), then copy "
                "the weights: for k, iv in local.interventions.items(): "
                "remote.interventions[k].load_state_dict(iv.state_dict()); remote.save(dir) "
                "writes hookwire's format")
        raise SavedModelError(f"no {CONFIG_FILE} in {load_directory!r}: not a folder written by "
                              "RemoteIntervenableModel.save")
    with open(config_path, encoding="utf-8") as fh:
        try:
            config = json.load(fh)
        except ValueError as exc:
            raise SavedModelError(f"{config_path}: not JSON ({exc})") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT or \
            config.get("version") != VERSION:
        raise SavedModelError(f"{config_path}: not a version-{VERSION} {FORMAT} file")
    return config, load_file(os.path.join(load_directory, WEIGHTS_FILE))


def _build(key: str, spec: dict, tensors: dict):
    if not isinstance(spec, dict) or spec.get("type") not in _TYPES:
        raise SavedModelError(f"intervention {key!r}: type {spec.get('type')!r} is not one of "
                              f"{', '.join(sorted(_TYPES))}")
    kwargs = {k: spec.get(k) for k in ("embed_dim", "low_rank_dimension", "latent_dim")
              if spec.get(k) is not None}
    for k, v in kwargs.items():
        if not isinstance(v, int) or v <= 0:
            raise SavedModelError(f"intervention {key!r}: {k} must be a positive integer")
    source = tensors.get(f"{key}/source_representation")
    if source is not None:
        kwargs["source_representation"] = source
    iv = _TYPES[spec["type"]](**kwargs)
    iv.subspace_partition = spec.get("subspace_partition")
    iv.is_source_constant = bool(spec.get("is_source_constant"))
    if spec.get("interchange_dim") is not None:
        iv.set_interchange_dim(spec["interchange_dim"])
    prefix = f"{key}/"
    state = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
    try:
        iv.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise SavedModelError(f"intervention {key!r}: saved tensors do not fit "
                              f"{spec['type']}: {str(exc).splitlines()[0]}") from None
    return iv


def load_config(load_directory: str):
    """(pyvene IntervenableConfig with intervention objects, saved keys) from a save."""
    config, tensors = _read(load_directory)
    keys, reps, specs = config.get("keys"), config.get("representations"), \
        config.get("interventions")
    if not (isinstance(keys, list) and isinstance(reps, list) and isinstance(specs, dict)
            and len(keys) == len(reps) and set(keys) == set(specs)):
        raise SavedModelError(f"{CONFIG_FILE}: keys, representations and interventions "
                              "do not match")
    if config.get("mode") not in ("parallel", "serial"):
        raise SavedModelError(f"{CONFIG_FILE}: mode must be 'parallel' or 'serial'")
    built: dict[str, object] = {}
    representations = []
    for key, fields in zip(keys, reps):
        if not isinstance(fields, dict) or set(fields) - set(_FIELDS):
            raise SavedModelError(f"representation of {key!r}: fields must be among "
                                  f"{', '.join(_FIELDS)}")
        spec = specs[key]
        owner = spec.get("weights") if isinstance(spec, dict) else None
        if owner == key:
            built[key] = _build(key, spec, tensors)
        elif owner not in built:
            raise SavedModelError(f"intervention {key!r} shares the weights of {owner!r}, "
                                  "which is not saved before it")
        representations.append(RepresentationConfig(**fields, intervention=built[owner]))
    return pv.IntervenableConfig(representations=representations,
                                 mode=config["mode"]), keys


def load_weights(remote, load_directory: str) -> None:
    """Load saved intervention tensors onto ``remote``'s existing interventions."""
    _, tensors = _read(load_directory)
    for key, iv in remote._pv.interventions.items():
        prefix = f"{key}/"
        state = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        if not state:
            continue  # a linked key: loaded with its owner
        try:
            iv.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SavedModelError(f"intervention {key!r}: {str(exc).splitlines()[0]}") from None


__all__ = ["SavedModelError", "save_interventions", "load_config", "load_weights",
           "CONFIG_FILE", "WEIGHTS_FILE"]
