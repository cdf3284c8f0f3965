"""The store commands that change a store, by name: the command line runs them on a store it
opens, or sends them to the mount that holds the store (fs/control.py), which runs them with
its own writer."""

from . import branches, evict, history, tags

OPERATIONS = {
    "snapshot": history.create_snapshot,
    "delete-snapshot": history.delete_snapshot,
    "prune": history.prune,
    "gc": history.collect,
    "branch": branches.create_branch,
    "delete-branch": branches.delete_branch,
    "merge": branches.merge,
    "tag": tags.tag,
    "evict": evict.evict,
}
