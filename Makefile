# chatlog: `make serve PORT=9999` and `make test` do all the set-up they need.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PORT   ?= 9999
ARGS   ?=
BINDIR ?= $(HOME)/.local/bin
ifeq ($(origin CC),default)
CC      = gcc
endif
CFLAGS ?= -O2 -g
WARN    = -std=gnu99 -Wall -Wextra -Werror
# OpenSSL, for --tls (Debian's libssl-dev; .ci/run installs it).
LDLIBS  = -lssl -lcrypto
PYTEST_ARGS ?=

.PHONY: all venv serve install uninstall test asan valgrind bench lint clean unsafe-header

all: chatclient

# Built to a temporary name and renamed, so a running client is never overwritten in place.
chatclient: c_client/chatclient.c c_client/unsafe.h
	$(CC) $(WARN) $(CFLAGS) -o $@.tmp $< $(LDLIBS) && mv -f $@.tmp $@

chatclient-asan: c_client/chatclient.c c_client/unsafe.h
	$(CC) $(WARN) -O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined \
	    -fno-sanitize-recover=all -o $@.tmp $< $(LDLIBS) && mv -f $@.tmp $@

# The client's framer alone, under the sanitizers, for the differential test against the server's.
framer-check: c_client/framer_check.c c_client/chatclient.c c_client/unsafe.h
	$(CC) $(WARN) -O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all \
	    -o $@.tmp $< $(LDLIBS) && mv -f $@.tmp $@

# The characters the client escapes, generated from chatlog/sanitize.py (a test checks it is current).
unsafe-header: venv
	$(PY) c_client/gen_unsafe.py > c_client/unsafe.h.tmp && mv -f c_client/unsafe.h.tmp c_client/unsafe.h

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet --config-settings editable_mode=compat -e '.[test]'  # a path in a .pth: no import hook to load at every start
	$(VENV)/bin/pip uninstall --quiet --yes setuptools  # (nothing here runs it; its distutils shim, a .pth, loaded at every start)
	touch $@

# make serve PORT=9999 ARGS="--room --bind 127.0.0.1"
serve: venv chatclient
	@command -v chatlog >/dev/null || echo "(chatlog is not on your PATH: 'make install' links it into $(BINDIR))"
	env -u PYTHONDONTWRITEBYTECODE $(VENV)/bin/chatlog serve $(PORT) $(ARGS)

# `chatlog` on the PATH: a link to this checkout's .venv/bin/chatlog (its own venv, as pipx
# would make one), in ~/.local/bin unless BINDIR says otherwise.
install: venv
	mkdir -p "$(BINDIR)"
	ln -sfn "$(abspath $(VENV))/bin/chatlog" "$(BINDIR)/chatlog"
	@echo "installed $(BINDIR)/chatlog -> $(abspath $(VENV))/bin/chatlog"
	@case ":$$PATH:" in *":$(BINDIR):"*) ;; *) echo "$(BINDIR) is not on your PATH: add  export PATH=\"$(BINDIR):\$$PATH\"  to ~/.profile (or ~/.bashrc)";; esac

uninstall:
	@if [ -L "$(BINDIR)/chatlog" ]; then rm -f "$(BINDIR)/chatlog" && echo "removed $(BINDIR)/chatlog"; fi

# -rs: every skipped test says why (no Chromium, no valgrind, not root, no IPv6 loopback).
# Eight workers on two cores: much of the suite waits (on clients' timeouts, a broker's election,
# a browser), and with eight the cores stay busy throughout: 58 s against 63-64 s with five or
# six, 70 s with four (measured on this project's 2-core machine, 2026-12-05).
# With the bytecode cache: the suite starts hundreds of servers and commands, and where
# PYTHONDONTWRITEBYTECODE is set each of them compiled every changed module again (~0.1 s each).
test: venv chatclient chatclient-asan
	env -u PYTHONDONTWRITEBYTECODE $(PY) -m pytest -n 8 --dist loadgroup -q -rs $(PYTEST_ARGS)

# The C client's hostile-server cases under AddressSanitizer/UBSan, then under valgrind.
asan: venv chatclient-asan
	$(PY) -m pytest -q -m asan tests

valgrind: venv chatclient
	$(PY) -m pytest -q -m valgrind tests

# The room figures compare against `ncat --chat` (Debian's nmap ncat), the linked-room ones need
# Debian's nats-server: installed here when missing and running as root; otherwise those rows say n/a.
bench: venv chatclient
	@command -v ncat >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q ncat >/dev/null; } \
	    || echo "ncat is missing and cannot be installed (not root): the room rows will say n/a"
	@command -v nats-server >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q nats-server >/dev/null; } \
	    || echo "nats-server is missing and cannot be installed (not root): the link rows will say n/a"
	env -u PYTHONDONTWRITEBYTECODE $(PY) bench/run.py  # start-up measured with the bytecode cache, as users meet it

lint: venv
	$(VENV)/bin/pip install --quiet ruff
	$(VENV)/bin/ruff check chatlog tests bench

clean:
	rm -f chatclient chatclient-asan framer-check
