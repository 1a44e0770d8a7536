"""The web page of `clipcond serve`: `runs` loads the runs it serves (once, on one device), `handlers` answers each
request (plain Python, tested without a browser), `page` lays them out as a Gradio app (the optional `ui` extra).
"""
