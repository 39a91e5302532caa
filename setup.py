from setuptools import setup

# Everything declarative lives in setup.cfg; twisted/plugins is listed there so that
# `twistd --help` finds the llmnode plugin after `pip install .`.
setup()
