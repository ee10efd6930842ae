"""``python -m libmoe_core.evaluation.launch ARGS``: lmms-eval's CLI with the libmoe models registered.

Same arguments and behaviour as ``python -m lmms_eval ARGS``; it first registers the
libmoe model manifests (:func:`.registration.register_with_lmms_eval`), for environments
where the ``lmms_eval.models`` entry point of libmoe-kit is not installed (an editable
install made before the entry point was declared). ``libmoe eval`` uses it only then.
"""

import sys

if __name__ == "__main__":
    from libmoe_core.evaluation.registration import register_with_lmms_eval

    register_with_lmms_eval()
    from lmms_eval.cli.dispatch import main

    main()
    sys.exit(0)
