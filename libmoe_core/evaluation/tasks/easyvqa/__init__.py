"""The easy-VQA test split as an lmms-eval task (``easyvqa``)."""
