"""Optimizers: Lion, Sophia, Prodigy, Schedule-Free AdamW, SOAP, Muon."""
from nexus.training.optimizers.lion import Lion
from nexus.training.optimizers.sophia import Sophia
from nexus.training.optimizers.prodigy import Prodigy
from nexus.training.optimizers.schedule_free import ScheduleFreeAdamW
from nexus.training.optimizers.muon import Muon, get_muon_optimizer
from nexus.training.optimizers.soap import SOAP
