"""The reference homeserver: a small Twisted host for modules such as this one.

It keeps users, devices and access tokens in SQLite and serves just enough of
the Client-Server API (login, logout, whoami, versions, capabilities) for an
operator to try a module end to end. The module never imports from here.
"""
