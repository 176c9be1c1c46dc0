"""`chatlog web`: the archive in a browser (sessions, a transcript, search, replay, follow,
downloads), read-only. The app is `chatlog.web.app`; nothing here is imported by any other
command, so the web stack (Starlette, uvicorn, Jinja2) loads only for this one.
"""
