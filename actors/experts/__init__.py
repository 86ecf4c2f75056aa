"""Mixture-of-Experts layers with their experts outside the verifier (issue 6).

dispatch.py groups a step's token rows by expert exactly as Hugging Face eager does and combines the unweighted
expert outputs in eager's order; expert_shard.py computes experts from the weights one shard holds; checkpoint.py
reads only a shard's experts from safetensors; hook.py plugs the dispatch into transformers' experts interface.
"""
