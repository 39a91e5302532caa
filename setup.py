from setuptools import setup
from setuptools.command.editable_wheel import editable_wheel


class editable_compat(editable_wheel):
    """Editable installs put the checkout itself on sys.path ("compat" mode).

    Twisted finds plugins by scanning sys.path for twisted/plugins folders; the default
    editable mode hides ours behind an import hook, and `twistd --help` would miss llmnode.
    """

    def initialize_options(self):
        super().initialize_options()
        self.mode = "compat"


# Everything declarative lives in setup.cfg; twisted/plugins is listed there so that
# `twistd --help` finds the llmnode plugin after `pip install .`.
setup(cmdclass={"editable_wheel": editable_compat})
