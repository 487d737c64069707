"""The node side: the agent that builds an execution environment from its plan (the initrd).

Standard library only.  For its start-up time, some standard-library modules are imported
only where they are needed (inside a function); they are listed here so that the initrd's
probe (slim.core.build.agentrt) puts them in the initrd too.  tests/test_agent_imports.py
checks that every such import is listed.
"""

DEFERRED = (
    "argparse",  # slim.agent.__main__: only for --help and a command line it does not read itself
    "concurrent.futures",  # slim.agent.sync.Fetcher: only when files are fetched
    "concurrent.futures.thread",
    "uuid",  # slim.agent.cache: a boot medium's partition
)
