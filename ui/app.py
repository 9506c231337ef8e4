"""The Panel entry point: ``panel serve ui/app.py [--args --api-url URL --poll-s 1]`` (what ``tickcast ui``
runs). Each browser session gets its own layout (ui/dashboard.py) over the process-wide feed."""
import panel as pn

from ui.dashboard import create_app

pn.extension(notifications=False)
create_app().servable(title="tickcast dashboard")
