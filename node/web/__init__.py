"""The web console: overview, models, jobs, results over their images, review, UPS workitems.

``app`` (routes, request log), ``pages`` (one handler per page or action), ``auth`` (users,
sessions, CSRF), ``queries`` (what the pages read from the tables), ``render`` (the overlay
PNGs, also behind ``modelnode jobs show N --png``), ``lineage`` (the SVG), ``server`` (uvicorn
on a thread of ``modelnode serve``). Nothing is imported here: the CLI's ``--png`` needs only
``render``, without the web stack. docs/console.md.
"""
