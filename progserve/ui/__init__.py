"""The tracing UI at /ui: a static page (vanilla JS, no build step) and its JSON API."""
