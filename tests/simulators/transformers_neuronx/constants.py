"""Layout names, as TNx spells them."""

LAYOUT_BSH = "BSH"
LAYOUT_HSB = "HSB"
LAYOUT_SBH = "SBH"

LAYOUTS = (LAYOUT_BSH, LAYOUT_HSB, LAYOUT_SBH)
