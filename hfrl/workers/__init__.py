"""Role workers: actor (generate through the hybrid engine, log-probs, advantages, update), reference,
critic, reward and cost models, rule rewards, and the rollout role (generation on a pool of its own). Each is a `hfrl.controller.Worker` whose registered
methods the trainers call through worker groups."""
from hfrl.workers.actor import ActorWorker, PolicyWorker
from hfrl.workers.critic import CriticWorker, RewardModelWorker
from hfrl.workers.rollout import RolloutWorker
from hfrl.workers.rule_reward import RuleRewardWorker

__all__ = ["ActorWorker", "CriticWorker", "PolicyWorker", "RewardModelWorker", "RolloutWorker", "RuleRewardWorker"]
