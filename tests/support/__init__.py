"""Test helpers: process and engine fixtures (:mod:`tests.support.fixtures`), thinkbrake servers
(:mod:`tests.support.servers`), the scripted serve tests' trace and checks (:mod:`tests.support.serving`), the fake
upstream, the OpenAI specification and metrics readers."""
