"""``RemoteIntervenableModel``: pyvene's ``IntervenableModel`` call, run on a hookwire server.

The client builds pyvene's own ``IntervenableModel`` over a *weightless* stand-in of the
server's model (an HF model of the reported family on the meta device). That gives exactly
pyvene's intervention keys, groups, links and intervention objects (with their parameters,
initialised as pyvene initialises them), and pyvene's own argument broadcasting. It is never
run: each call is planned (``plan``), traced (``translate``) and sent as one graph whose single
forward holds the base rows and the source rows together.
"""
from __future__ import annotations

import os

import torch
import pyvene as pv
from pyvene.models.configuration_intervenable_model import RepresentationConfig
from pyvene.models.intervenable_base import IntervenableModelOutput
from pyvene.models.intervenable_modelcard import type_to_module_mapping

from hookwire.client import get_connection
from hookwire.errors import HookwireError, UnsupportedModel
from hookwire.families import build_hf_model, family_for_architecture, output_class
from hookwire.pyvene.allowed import check_intervention
from hookwire.pyvene.components import check_fires, component_site
from hookwire.pyvene.inputs import UnsupportedInput, model_inputs
from hookwire.pyvene import persist
from hookwire.pyvene.plan import Layout, parallel_tasks, serial_tasks
from hookwire.pyvene.training import DifferentiableCall
from hookwire.pyvene.translate import trace_call
from hookwire.remote_call import RemoteCall


def _never(site) -> bool:
    """``can_cut`` for a model that is not causal: no row block is cut short."""
    return False


class NotSupportedRemotely(HookwireError, AttributeError):
    """A part of pyvene's ``IntervenableModel`` API that a remote model does not offer."""
    code = "not_supported_remotely"


class RemoteIntervenableModel:
    """Stands in for ``pv.IntervenableModel(config, model)`` with the model on a server.

    ``model`` is the served model's name. ``url`` / ``api_key`` default to
    ``hookwire.configure`` / ``HOOKWIRE_URL``. ``interventions``, ``representations``,
    ``sorted_keys``, ``get_trainable_parameters()`` are pyvene's own objects: set intervention
    weights on them as you would locally."""

    def __init__(self, config, model: str, *, url: str | None = None,
                 api_key: str | None = None, use_fast: bool = False, progress: bool = False):
        self.model_name = model
        self._target = (url, api_key)
        self._out_device = torch.device("cpu")
        self.progress = progress
        info = get_connection(url, api_key).model_info(model)
        self.info = info
        if "hf:*" in info.unserved:
            raise UnsupportedModel(f"model {model!r} offers no HF module sites: "
                                   f"{info.unserved['hf:*']}")
        self.family = family_for_architecture(info.architecture)
        self.stand_in, self.hf_config = build_hf_model(info.architecture, info.config,
                                                       device="meta")
        self.model_class = type(self.stand_in)
        if isinstance(config, (dict, list)):
            config = pv.IntervenableConfig(representations=config)
        # Name errors first, and typed: pyvene itself would fail on them with a bare
        # AttributeError while resolving module paths on the stand-in.
        for rep in config.representations:
            check_fires(component_site(self.model_class, rep), info, model)
        self._pv = pv.IntervenableModel(config, self.stand_in, use_fast=use_fast)
        self._use_fast = use_fast
        self.sites = {key: component_site(self.model_class, rep)
                      for key, rep in self._pv.representations.items()}
        for key, iv in self._pv.interventions.items():
            check_intervention(key, iv)
        # What comes back is the forward's own output: logits (after all the model does to
        # them), or a base model's last hidden state.
        self.has_lm_head = info.output == "logits"
        self.output_dim = int(self.hf_config.vocab_size if self.has_lm_head
                              else self.hf_config.hidden_size)
        self.output_class = output_class(self.model_class, self.has_lm_head)

    # ---- pyvene's surface -------------------------------------------------------------------
    @property
    def interventions(self):
        return self._pv.interventions

    @property
    def representations(self):
        return self._pv.representations

    @property
    def sorted_keys(self):
        return self._pv.sorted_keys

    @property
    def mode(self):
        return self._pv.mode

    @property
    def config(self):
        return self._pv.config

    def get_trainable_parameters(self):
        return [p for iv in self._pv.interventions.values()
                if isinstance(iv, pv.TrainableIntervention) for p in iv.parameters()]

    def named_parameters(self, recurse=True):
        """The trainable interventions' parameters, named as pyvene names them (the served
        model has none that train)."""
        return [(f"{k}.{n}", p) for k, iv in self._pv.interventions.items()
                if isinstance(iv, pv.TrainableIntervention) for n, p in iv.named_parameters()]

    def count_parameters(self, include_model=False):
        return self._pv.count_parameters(include_model=False)

    def set_temperature(self, temp):
        self._pv.set_temperature(temp)

    def set_zero_grad(self):
        self._pv.set_zero_grad()

    def zero_grad(self):
        self._pv.zero_grad()

    def disable_model_gradients(self):
        """The served model's weights never get gradients: nothing to do."""

    def disable_intervention_gradients(self):
        """As in pyvene 0.1.8: does nothing."""

    def enable_model_gradients(self):
        raise HookwireError("the served model is shared and never trained: its weights get no "
                            "gradients remotely. Train interventions only, or fine-tune the "
                            "model locally with pyvene")

    # ---- devices ----------------------------------------------------------------------------
    def set_device(self, device, set_model=True):
        """pyvene's ``set_device``: the interventions move to ``device``; the model stays on
        the server (``set_model`` changes nothing there). Outputs come back on the device of
        the call's ``input_ids``, as a local model's outputs live on its inputs' device."""
        for iv in self._pv.interventions.values():
            iv.to(device)
        self._device = torch.device(device)

    def get_device(self):
        """Where this model's interventions live (``set_device``), ``cpu`` by default."""
        return getattr(self, "_device", torch.device("cpu"))

    # ---- saving (data only: hookwire.pyvene.persist) -----------------------------------------
    def save(self, save_directory, save_to_hf_hub=False, hf_repo_name="my-awesome-model",
             include_model=False):
        """pyvene's ``save``: the config and every intervention's tensors, as JSON and
        safetensors (never a pickle). ``include_model`` adds nothing: the served model has no
        trainable weights of this user's."""
        if save_to_hf_hub:
            raise HookwireError("save_to_hf_hub is not supported: save to a folder, then upload "
                                "it with huggingface_hub yourself")
        persist.save_interventions(self, save_directory)

    @staticmethod
    def load(load_directory, model: str, *, url: str | None = None,
             api_key: str | None = None, use_fast: bool = False, progress: bool = False,
             local_directory=None, from_huggingface_hub=False, include_model=False):
        """pyvene's ``IntervenableModel.load``, with ``model`` the served model's name: a
        folder written by :meth:`save` (types mapped by name to the allow-list, never
        imported)."""
        if from_huggingface_hub or not os.path.isdir(load_directory):
            raise persist.SavedModelError(f"{load_directory!r} is not a local folder; hub "
                                          "downloads are not supported: download it first")
        config, keys = persist.load_config(load_directory)
        remote = RemoteIntervenableModel(config, model, url=url, api_key=api_key,
                                         use_fast=use_fast, progress=progress)
        if list(remote.sorted_keys) != list(keys):
            raise persist.SavedModelError(f"the saved keys {keys} do not match the rebuilt "
                                          f"model's {remote.sorted_keys}")
        return remote

    def save_intervention(self, save_directory, include_model=True):
        """pyvene's ``save_intervention``: the interventions' tensors (and config) only."""
        persist.save_interventions(self, save_directory)

    def load_intervention(self, load_directory, include_model=True):
        """pyvene's ``load_intervention``: saved tensors onto these interventions."""
        persist.load_weights(self, load_directory)

    def generate(self, *args, **kwargs):
        raise HookwireError("RemoteIntervenableModel.generate is not supported yet: run "
                            "pyvene's generate locally, or generate remotely with hookwire.hf "
                            "(RemoteModel.generate with module hooks)")

    def __getattr__(self, name):
        # Only reached for attributes the class does not define: name pyvene's API we lack
        # instead of a bare AttributeError.
        if not name.startswith("__") and hasattr(pv.IntervenableModel, name):
            raise NotSupportedRemotely(
                f"RemoteIntervenableModel has no {name!r} (pyvene's IntervenableModel.{name}): "
                "the model runs on a server, so only calls, interventions, training, devices "
                "and save/load are available remotely")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def forward(self, *args, **kwargs):
        return self(*args, **kwargs)

    def train(self, mode: bool = True):
        """Only the local interventions change mode: the served model is always in eval."""
        self._pv.interventions.train(mode)
        return self

    def _eval_mode(self):
        return self.train(False)

    # nn.Module's spelling of the mode switch (users call model.eval()); bound by assignment
    # so no line of product code reads like a call of Python's eval builtin.
    eval = _eval_mode

    # ---- the call ---------------------------------------------------------------------------
    def __call__(self, base, sources=None, unit_locations=None, source_representations=None,
                 subspaces=None, labels=None, output_original_output=False, return_dict=None,
                 use_cache=None, intervention_additional_kwargs=None):
        pvm = self._pv
        for key, iv in pvm.interventions.items():
            check_intervention(key, iv)  # they may have been swapped since construction
        if intervention_additional_kwargs:
            raise HookwireError("intervention_additional_kwargs only matter to custom "
                                "interventions, which cannot run remotely")
        if sources is not None and not isinstance(sources, list):
            sources = [sources]
        base_in = model_inputs(base, "base")
        if base_in.labels is not None:
            if labels is not None:  # model(**base, labels=labels), as pyvene calls it
                raise UnsupportedInput("labels are given twice: in base and as labels=")
            labels = base_in.labels
        base_inputs = (base_in.input_ids, base_in.attention_mask)
        self._out_device = base_in.device
        if sources is None and source_representations is None and unit_locations is None \
                and len(pvm.interventions) == 0:
            layout = Layout()
            return self._run(layout, [layout.add(*base_inputs)], [], False, labels)[1], None
        batch = base_inputs[0].shape[0]
        pvm.use_fast = self._use_fast  # pyvene leaves it on after one broadcast call
        unit_locations = pvm._broadcast_unit_locations(batch, unit_locations)
        sources = [None] * len(pvm._intervention_group) if sources is None else \
            pvm._broadcast_sources(list(sources))
        source_reps = pvm._broadcast_source_representations(source_representations)
        subspaces = pvm._broadcast_subspaces(batch, subspaces)
        pvm._input_validation(base, sources, unit_locations, source_reps, subspaces)
        use_fast = pvm.use_fast
        pvm.use_fast = self._use_fast

        layout = Layout()
        outputs = [layout.add(*base_inputs)]
        if output_original_output:  # the same base, never intervened on; kept next to it
            outputs.append(layout.add(*base_inputs))
        # One tensor per distinct source object: groups given the same source (pyvene
        # broadcasts one source to all groups) then share its rows in parallel mode.
        converted: dict[int, tuple] = {}
        source_inputs = []
        for i, s in enumerate(sources):
            if s is not None and id(s) not in converted:
                src = model_inputs(s, f"sources[{i}]")
                converted[id(s)] = (src.input_ids, src.attention_mask)
                if converted[id(s)][0].shape[0] != batch:
                    raise HookwireError(f"sources[{i}] has batch size "
                                        f"{converted[id(s)][0].shape[0]}, the base {batch}: "
                                        "pyvene pairs them row by row")
            source_inputs.append(None if s is None else converted[id(s)])
        if source_reps is not None and not torch.is_grad_enabled():
            # With autograd on they stay linked: a steering vector being optimised gets its
            # gradient, as locally (see _run).
            source_reps = {k: v.detach() for k, v in source_reps.items()}
        make = parallel_tasks if pvm.mode == "parallel" else serial_tasks
        tasks = make(pvm, layout, self.sites, source_inputs, unit_locations, source_reps,
                     subspaces, can_cut=self._sequence_first if self.info.causal else _never)
        base_out, cf_out, collected = self._run(layout, outputs, tasks, use_fast, labels,
                                                base_in.labels)
        if collected is not None:
            if return_dict:
                return IntervenableModelOutput(original_outputs=base_out,
                                               intervened_outputs=cf_out,
                                               collected_activations=collected)
            return (base_out, collected), cf_out
        if return_dict:
            return IntervenableModelOutput(original_outputs=base_out, intervened_outputs=cf_out,
                                           collected_activations=None)
        return base_out, cf_out

    def _run(self, layout: Layout, outputs, tasks, use_fast, labels=None, base_labels=None):
        """``labels``: for the intervened output's loss; ``base_labels``: the base's own (the
        untouched copy's loss: pyvene runs it as ``model(**base)``)."""
        # With autograd on and trainable parameters, the call is differentiable with respect
        # to them (pyvene's training loop: loss.backward() on the returned logits).
        if not self.info.causal and len({r.length for r in layout.rows}) > 1:
            # Local pyvene runs base and sources as forwards of their own lengths; here they
            # share one forward, padded to the longest, and in a model whose later tokens
            # change earlier positions padding changes the result.
            raise UnsupportedModel(
                f"{self.model_name!r} is not causal (a later token changes earlier positions' "
                "outputs), so its base and sources cannot be padded into one remote forward, "
                f"and they have different lengths ({sorted({r.length for r in layout.rows})}): "
                "give every source the base's length, or run pyvene locally",
                architecture=self.info.architecture)
        # So is it with respect to source_representations that require grad (a steering
        # vector optimised by the caller).
        differentiable = torch.is_grad_enabled() and (
            any(p.requires_grad for p in self.get_trainable_parameters())
            or any(isinstance(t.source_constant, torch.Tensor) and t.source_constant.requires_grad
                   for t in tasks))
        traced = trace_call(tasks, layout, self.info, self.model_name, self.model_class,
                            self.hf_config, use_fast, self._pv._intervention_reverse_link,
                            self.output_dim, outputs, self._narrowing(layout, outputs, tasks),
                            differentiable=differentiable)
        tr = traced.tracer
        tensors = {"input_ids": layout.input_ids(pad_id=0)}
        inputs = {"input_ids": "input_ids"}
        mask = layout.attention_mask()
        if mask is not None:
            inputs["attention_mask"] = "attention_mask"
            tensors["attention_mask"] = mask
        tensors.update(tr.constants)
        graph = {"version": 1, "model": self.model_name, "inputs": inputs,
                 "constants": list(tr.constants), "sites": tr.sites, "nodes": tr.nodes,
                 "saves": tr.saves,
                 "forward": {"return_type": "logits", "send_output": False}}
        leaves = tr.differentiable_constants() if differentiable else []
        if leaves:
            values = DifferentiableCall(graph, tensors, list(tr.saves), leaves,
                                        self._request).apply()
        else:
            values = self._request(graph, tensors)
        device = self._out_device  # where the caller's inputs are, as a local model's outputs
        logits = [values[name].to(device) for name in traced.output_names]
        if not self.has_lm_head:  # a base model returns its last hidden state
            if labels is not None or base_labels is not None:
                raise HookwireError(f"labels=: {self.info.architecture} has no LM head, so "
                                    "there is no loss to compute")
            cf_out = self.output_class(last_hidden_state=logits[0])
            base_out = self.output_class(last_hidden_state=logits[1]) if len(outputs) > 1 \
                else None
        else:
            # past_key_values stay None: a cache is not worth its bytes for a single forward.
            cf_out = self.output_class(loss=self._loss(logits[0], labels), logits=logits[0])
            base_out = self.output_class(loss=self._loss(logits[1], base_labels),
                                         logits=logits[1]) \
                if len(outputs) > 1 else None
        has_collect = any(isinstance(iv, pv.CollectIntervention)
                          for iv in self._pv.interventions.values())
        collected = None
        if has_collect:
            by_key = {}
            for k, key in enumerate(traced.collect_keys):
                by_key.setdefault(key, []).append(values[f"__collect_{k}"].to(device))
            collected = [v for key in self._pv.sorted_keys for v in by_key.get(key, [])]
        return base_out, cf_out, collected

    def _loss(self, logits, labels):
        """The model's own loss function, on the returned logits (None without labels)."""
        if labels is None:
            return None
        return self.stand_in.loss_function(logits=logits, labels=labels.to(logits.device),
                                           vocab_size=self.hf_config.vocab_size)

    def _request(self, graph: dict, tensors: dict) -> dict:
        """Run one graph (a call, or its backward: see training.py); its values by name.
        The call's return value is built from them: nothing is rebound."""
        call = RemoteCall(self.model_name, graph, tensors, progress=self.progress)
        return call.send(get_connection(*self._target)).values

    def _sequence_first(self, cs) -> bool:
        """Whether the values at a component's sites are (batch, seq, ...) with no other
        sequence dim: there a row block may be cut to the positions an intervention uses."""
        for name in (cs.site, cs.input_site):
            index = self.info.site_index.get((name, 0))
            if index is None:
                continue
            shape = tuple(self.info.sites[index].shape)
            if shape[:2] != ("B", "S") or "S" in shape[2:] or "B" in shape[2:]:
                return False
        return True

    def _narrowing(self, layout: Layout, outputs, tasks):
        """(block-output site, rows kept) where the rows only interventions read (sources)
        leave the batch: after the last block whose output or inner modules touch them, the
        forward (and the LM head) runs on the kept rows only; the server narrows the
        attention mask and other per-row arguments with them (``server/narrowing.py``). None
        when that cannot be done safely: components given as raw module paths."""
        keep = outputs[-1].stop  # output rows come first in the layout
        if layout.rows[-1].stop == keep:
            return None
        table = type_to_module_mapping.get(self.model_class, {})
        touching = [t for t in tasks if (t.src is not None and t.src.start >= keep)
                    or t.dst.start >= keep]
        if not touching or "block_output" not in table or \
                any(t.site.component not in table for t in touching):
            return None
        layer = max(int(self._pv.representations[t.key].layer) for t in touching)
        site = component_site(self.model_class, RepresentationConfig(
            layer=layer, component="block_output")).site
        index = self.info.site_index.get((site, 0))
        last = max(self.info.site_index[(n, 0)] for t in touching
                   for n in (t.site.site, t.site.input_site)
                   if (n, 0) in self.info.site_index)
        if index is None or index < last:
            return None
        return site, keep


def _module_path(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise HookwireError("the model's output embedding is not one of its modules")


__all__ = ["RemoteIntervenableModel", "NotSupportedRemotely"]
