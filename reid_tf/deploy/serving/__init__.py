"""reid-serve: TF Serving's REST API over an export, plus a live gallery.
"""
