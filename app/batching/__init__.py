"""Dynamic batching, one batcher per model: the policy (``BatchPolicy``), the bounded queue with its
admission and deadlines (``ClipQueue``), and the worker threads that run batches (``Batcher``)."""

from app.batching.batcher import Batcher, Pending, Run
from app.batching.policy import BatchPolicy
from app.batching.queue import ClipQueue
from app.batching.tickets import BatchStats, Result, Ticket, new_tickets, settle

__all__ = [
    "BatchPolicy",
    "BatchStats",
    "Batcher",
    "ClipQueue",
    "Pending",
    "Result",
    "Run",
    "Ticket",
    "new_tickets",
    "settle",
]
