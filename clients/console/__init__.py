"""The guest's serial console: served by the client on a unix socket (``service``), used by ``vmfront console``
(``interactive``)."""
