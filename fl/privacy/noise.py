"""Gaussian noise for DP aggregates, from a generator whose seed nobody can guess.

The guarantee of the Gaussian mechanism holds only if the noise is unknown to the
observer: a seed that can be guessed (the run's ``--seed``, a time stamp) lets anyone who
knows it subtract the noise. So the seed comes from the operating system's CSPRNG
(``secrets``) unless the operator asks for a reproducible one, and the log says which.

Known limits, as in every float-based DP library: torch's CPU generator is a Mersenne
Twister (fast, not a cryptographic generator; its 64-bit seed is secret, its later
outputs are not provably unpredictable from earlier ones, though only noised sums are
ever released), and floating-point Gaussian samples are open to Mironov's
least-significant-bits attack (CCS 2012). Neither is addressed here.
"""
from __future__ import annotations

import secrets

import torch

from fl.common.vectors import slices


def make_generator(seed: int | None) -> tuple[torch.Generator, str]:
    """A CPU ``torch.Generator`` for DP noise and one line for the log saying how it was seeded.

    ``seed=None`` draws a 64-bit seed from ``secrets`` (never logged, never stored);
    an int gives a reproducible generator, whose noise is known to whoever knows the seed.
    """
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.manual_seed(secrets.randbits(64))
        return generator, "DP noise: seeded from the OS CSPRNG (secret, not stored)"
    generator.manual_seed(seed)
    return generator, (f"DP noise: fixed seed {seed} (reproducible; the noise is known to "
                       "anyone who knows the seed, so the privacy guarantee does not hold against them)")


def add_gaussian_noise_(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, std^2) to every entry of ``x`` in place, drawn in ``x``'s dtype in slices
    (no model-sized temporary); returns ``x``."""
    if not std >= 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if std == 0:
        return x
    flat = x.view(-1)
    for span in slices(flat.numel()):
        part = flat[span]
        part.add_(torch.randn(part.numel(), generator=generator, dtype=x.dtype), alpha=std)
    return x
