# claudeflare: the only targets a newcomer needs.
PYTHON ?= python3

.PHONY: run test bench

run:
	$(PYTHON) claudeflare.py serve

test:
	$(PYTHON) -X dev -W error test_claudeflare.py

bench:
	$(PYTHON) test_claudeflare.py bench
