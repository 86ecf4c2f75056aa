"""The KV block store: the cluster tier of the KV cache. Redis holds the index, holders (or Redis) the payloads.

namespace.py  what makes KV compatible (the root of every block key)
payload.py    block bytes, checksums, layouts
index.py      the Redis index: two-phase writes, one-round-trip prefix lookup, bounded size, fencing
holder.py     node-local holder actors that keep payloads in Ray's object store
store.py      the client a verifier uses: fetch a prompt's blocks, export computed ones off the hot path
"""
