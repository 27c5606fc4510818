"""The PyTorch side of the benchmark: the diffusers module itself, trained and sampled the way
a PyTorch user would (AdamW, global-norm clipping, the same loss), eager and under torch.compile.

The weights are drawn here (seeded) and saved as safetensors; the JAX worker converts exactly
those tensors.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from jdistill.bench.specs import EXTRA_TASKS, ModelSpec, resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
T = 1000
FLOW_SHIFT = 3.0


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TorchSide:
    def build(self, spec: dict, weights: str, dtype: str, seed: int = 0) -> dict:
        import diffusers
        from safetensors.torch import save_file

        self.spec = spec = ModelSpec(**spec)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.autocast = DTYPES[dtype] if dtype != "float32" else None
        torch.manual_seed(seed)
        model = getattr(diffusers, spec.diffusers_class)(**spec.config)
        # diffusers zero-initialises some output layers; redraw every weight so that no
        # activation is trivially zero on either side
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim > 1:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
        self.models = {"eager": model.to(self.device).train()}
        betas = np.linspace(1e-4, 0.02, T, dtype=np.float64).astype(np.float32)
        self.alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas, dtype=np.float32), device=self.device)
        self.cond = self._conditions(seed)
        self.x = torch.randn(spec.batch, spec.channels, spec.latent_hw, spec.latent_hw, device=self.device)
        self.optimizers, self.errors = {}, {}
        return dict(torch=torch.__version__, device=str(self.device),
                    params=int(sum(p.numel() for p in model.parameters())))

    def _conditions(self, seed):
        spec, gen = self.spec, torch.Generator().manual_seed(seed)
        if spec.num_classes:
            return dict(class_labels=torch.randint(0, spec.num_classes, (spec.batch,), generator=gen))
        out = dict(encoder_hidden_states=torch.randn(spec.batch, spec.text_tokens, spec.text_width, generator=gen))
        if spec.pooled_width:
            out["pooled_projections"] = torch.randn(spec.batch, spec.pooled_width, generator=gen)
        return {k: v.to(self.device) for k, v in out.items()}

    def _model(self, impl):
        if impl not in self.models:  # "compile": its own copy, so each variant has its own optimizer
            self.models[impl] = torch.compile(copy.deepcopy(self.models["eager"]))
        return self.models[impl]

    def _forward(self, model, z, t, cond):
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            return model(z, timestep=t, **cond, return_dict=False)[0].float()

    def _train_step(self, impl):
        model = self._model(impl)
        if impl not in self.optimizers:
            self.optimizers[impl] = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                                      weight_decay=0.0)
        opt, x, b, c = self.optimizers[impl], self.x, self.spec.batch, self.spec.channels

        def step():
            opt.zero_grad(set_to_none=True)
            eps = torch.randn_like(x)
            if self.spec.schedule == "flow":
                t = torch.rand(b, device=self.device)
                t = FLOW_SHIFT * t / (1 + (FLOW_SHIFT - 1) * t)
                tt = t[:, None, None, None]
                z, target, model_t = (1 - tt) * x + tt * eps, eps - x, T * t
            else:
                t = torch.randint(0, T, (b,), device=self.device)
                ab = self.alphas_cumprod[t][:, None, None, None]
                z, target, model_t = ab.sqrt() * x + (1 - ab).sqrt() * eps, eps, t
            out = self._forward(model, z, model_t, self.cond)[:, :c]
            loss = torch.mean((out - target) ** 2)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            return loss

        return step

    def _sampler(self, impl, task):
        """DDIM (eps models) or Euler (flow models) from pure noise, one model call per step; the
        teacher runs classifier-free guidance as one batch of 2B, as diffusers' pipelines do."""
        spec, model = self.spec, self._model(impl)
        teacher = task == "teacher"
        n = spec.teacher_steps if teacher else spec.student_steps
        b = spec.batch
        cond = self.cond
        if teacher:
            null = ({"class_labels": torch.full_like(cond["class_labels"], spec.num_classes)} if spec.num_classes
                    else {k: torch.zeros_like(v) for k, v in cond.items()})
            cond = {k: torch.cat([v, null[k]]) for k, v in cond.items()}
        noise = torch.randn(b, spec.channels, spec.latent_hw, spec.latent_hw, device=self.device)
        c = spec.channels

        def call(z, t):
            zz = torch.cat([z, z]) if teacher else z
            out = self._forward(model, zz, torch.full((zz.shape[0],), float(t), device=self.device), cond)[:, :c]
            if teacher:
                oc, ou = out.chunk(2)
                out = ou + spec.guidance_scale * (oc - ou)
            return out

        @torch.inference_mode()
        def sample():
            z = noise
            if spec.schedule == "flow":
                s = np.linspace(1.0, 1.0 / n, n)
                s = FLOW_SHIFT * s / (1 + (FLOW_SHIFT - 1) * s)
                for i in range(n):
                    s_next = s[i + 1] if i + 1 < n else 0.0
                    z = z + (s_next - s[i]) * call(z, T * s[i])
                return z
            ts = np.arange(0, n)[::-1] * (T // n)
            for i, t in enumerate(ts):
                a_t = self.alphas_cumprod[t]
                a_s = self.alphas_cumprod[ts[i + 1]] if i + 1 < n else torch.ones((), device=self.device)
                eps = call(z, t)
                x0 = (z - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                z = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
            return z

        return sample

    def prepare(self, impl: str, task: str) -> dict:
        """Build and run ``task`` once (torch.compile compiles here); its time and the allocator's
        peak during it (CUDA only)."""
        if task in EXTRA_TASKS:
            if EXTRA_TASKS[task][1] is None:
                raise NotImplementedError(f"task {task!r} has no PyTorch counterpart")
            fn = resolve(EXTRA_TASKS[task][1])(self, impl)
        else:
            fn = self._train_step(impl) if task == "train" else self._sampler(impl, task)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        fn()
        _sync(self.device)
        setattr(self, f"_fn_{impl}_{task}", fn)
        return dict(warmup_s=time.perf_counter() - start,
                    peak_bytes=int(torch.cuda.max_memory_allocated(self.device)) if cuda else None)

    def time(self, impl: str, task: str, n: int) -> list[tuple[float, float]]:
        fn = getattr(self, f"_fn_{impl}_{task}")
        out = []
        for _ in range(n):
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            _sync(self.device)
            out.append((time.perf_counter() - start, time.process_time() - cpu))
        return out
