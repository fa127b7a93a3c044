"""Reading a compiled step: HLO collectives, analytic costs beside measured ones, reports, plots."""
